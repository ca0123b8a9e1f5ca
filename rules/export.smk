rule export:
    input:
        model=f"{RUN}/model",
        base=MODEL,
        train=f"{RUN}/train.json",
        data=f"{DATA}/manifest.json",
    output:
        directory(f"{RUN}/export"),
    params:
        cfg=stage_cfg("export"),
        run_dir=RUN,
        data=DATA,
    resources:
        mem_mb=SLURM.mem_mb_per_gpu,
        runtime=SLURM.merge_minutes,
    log:
        f"{LOGS}/export.log",
    benchmark:
        f"{BENCH}/export.tsv"
    shell:
        "{PY} -m workflow.export --config {params.cfg:q} --model {input.model} --base-model {input.base}"
        " --run-dir {params.run_dir} --data {params.data} --out {output} > {log} 2>&1"
