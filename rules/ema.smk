rule ema:
    input:
        train=f"{RUN}/train.json",
        model=MODEL,
    output:
        directory(f"{RUN}/model"),
    params:
        cfg=stage_cfg("ema"),
        run_dir=RUN,
    resources:
        mem_mb=SLURM.mem_mb_per_gpu,
        runtime=SLURM.merge_minutes,
    log:
        f"{LOGS}/ema.log",
    benchmark:
        f"{BENCH}/ema.tsv"
    shell:
        "{PY} -m workflow.ema --config {params.cfg:q} --model {input.model} --run-dir {params.run_dir}"
        " --out {output} > {log} 2>&1"
