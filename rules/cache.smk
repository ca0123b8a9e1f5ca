rule cache:
    input:
        data=f"{DATA}/manifest.json",
        model=MODEL,
    output:
        manifest=f"{LATENTS}/manifest.json",
    params:
        cfg=stage_cfg("cache"),
        data=DATA,
        out=LATENTS,
    log:
        f"logs/latents/{CFG.dataset_name}/{CFG.encoder_key}.log",
    benchmark:
        f"benchmarks/latents/{CFG.dataset_name}/{CFG.encoder_key}.tsv"
    threads: job_cores()
    resources:
        **gpu_job(SLURM.gpus_per_node, SLURM.cache_minutes),
    shell:
        "{PY} -m workflow.cache --config {params.cfg:q} --data {params.data} --model {input.model}"
        " --out {params.out} > {log} 2>&1"
