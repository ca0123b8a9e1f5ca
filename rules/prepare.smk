# A Hub data set is downloaded by prepare: then it runs where the internet is (the login node).
if CFG.data.source.startswith("hf:") and not Path(CFG.data.source[3:]).expanduser().exists():

    localrules:
        prepare,


rule prepare:
    output:
        manifest=f"{DATA}/manifest.json",
    params:
        cfg=stage_cfg("prepare"),
        out=DATA,
    log:
        f"logs/data/{CFG.dataset_name}/prepare.log",
    benchmark:
        f"benchmarks/data/{CFG.dataset_name}/prepare.tsv"
    shell:
        "{PY} -m workflow.prepare --config {params.cfg:q} --out {params.out} > {log} 2>&1"
