# A Hub data set (the data's or the prior images') is downloaded by prepare: then it runs where the
# internet is (the login node).
if any(source and source.startswith("hf:") and not Path(source[3:]).expanduser().exists()
       for source in (CFG.data.source, None if CFG.data.prior.generated else CFG.data.prior.source)):

    localrules:
        prepare,


rule prepare:
    output:
        manifest=f"{DATA}/manifest.json",
    params:
        cfg=stage_cfg("prepare"),
        out=DATA,
    log:
        f"logs/data/{CFG.prepared_name}/prepare.log",
    benchmark:
        f"benchmarks/data/{CFG.prepared_name}/prepare.tsv"
    shell:
        "{PY} -m workflow.prepare --config {params.cfg:q} --out {params.out} > {log} 2>&1"
