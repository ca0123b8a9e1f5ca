# builtin:tiny (-sd2, -xl) is fitted on the prepared data; other models do not depend on it.
FITTED_ON_DATA = CFG.model.pretrained in TINY_BUILTINS


def fetch_model_inputs(wildcards):
    return [f"{DATA}/manifest.json"] if FITTED_ON_DATA else []


# A Hub download needs the login node's internet; a builtin model, a local folder or a single-file
# checkpoint (converted here) is a job.
if SOURCE.kind == "hub":

    localrules:
        fetch_model,


rule fetch_model:
    input:
        fetch_model_inputs,
    output:
        directory(MODEL),
    params:
        cfg=stage_cfg("fetch_model"),
        data=f"--data {DATA}" if FITTED_ON_DATA else "",
    log:
        f"logs/models/{CFG.model_name}.log",
    benchmark:
        f"benchmarks/models/{CFG.model_name}.tsv"
    threads: job_cores()
    shell:
        "{PY} -m workflow.fetch_model --config {params.cfg:q} {params.data} --out {output} > {log} 2>&1"
