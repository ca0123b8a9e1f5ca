# builtin:tiny is fitted on the prepared data; other models do not depend on it.
def fetch_model_inputs(wildcards):
    return [f"{DATA}/manifest.json"] if CFG.model.pretrained == "builtin:tiny" else []


localrules:
    fetch_model,  # a Hub download needs the login node's internet


rule fetch_model:
    input:
        fetch_model_inputs,
    output:
        directory(MODEL),
    params:
        cfg=stage_cfg("fetch_model"),
        data=f"--data {DATA}" if CFG.model.pretrained == "builtin:tiny" else "",
    log:
        f"logs/models/{CFG.model_name}.log",
    benchmark:
        f"benchmarks/models/{CFG.model_name}.tsv"
    threads: workflow.cores
    shell:
        "{PY} -m workflow.fetch_model --config {params.cfg:q} {params.data} --out {output} > {log} 2>&1"
