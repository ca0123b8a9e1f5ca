rule sample:
    input:
        model=f"{RUN}/model",
        base=MODEL,
        latents=f"{LATENTS}/manifest.json",
        train=f"{RUN}/train.json",
    output:
        grid=report(f"{RUN}/samples/grid.png", caption="report/grid.rst", category="Samples"),
        metrics=f"{RUN}/samples/metrics.json",
        **(
            {"checkpoints": report(f"{RUN}/samples/checkpoints.png", caption="report/checkpoints.rst", category="Samples")}
            if CFG.sample.checkpoints
            else {}
        ),
    params:
        cfg=stage_cfg("sample"),
        latents=LATENTS,
        run_dir=RUN,
        out=f"{RUN}/samples",
    log:
        f"{LOGS}/sample.log",
    benchmark:
        f"{BENCH}/sample.tsv"
    threads: job_cores()
    resources:
        **gpu_job(1, SLURM.sample_minutes),
    shell:
        "{PY} -m workflow.sample --config {params.cfg:q} --model {input.model} --base-model {input.base}"
        " --latents {params.latents} --run-dir {params.run_dir} --out {params.out} > {log} 2>&1"
