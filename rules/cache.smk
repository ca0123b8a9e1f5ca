rule cache:
    input:
        data=f"{DATA}/manifest.json",
        model=MODEL,
        **({"prior": f"{PRIOR}/manifest.json"} if PRIOR else {}),
    output:
        manifest=f"{LATENTS}/manifest.json",
    params:
        cfg=stage_cfg("cache"),
        data=DATA,
        out=LATENTS,
        prior=f"--prior {PRIOR}" if PRIOR else "",
    log:
        f"logs/latents/{CFG.dataset_name}/{CFG.encoder_key}.log",
    benchmark:
        f"benchmarks/latents/{CFG.dataset_name}/{CFG.encoder_key}.tsv"
    threads: job_cores()
    resources:
        **gpu_job(SLURM.gpus_per_node, SLURM.cache_minutes),
    shell:
        "{PY} -m workflow.cache --config {params.cfg:q} --data {params.data} --model {input.model}"
        " --out {params.out} {params.prior} > {log} 2>&1"
