rule sample:
    input:
        model=f"{RUN}/model",
    output:
        grid=f"{RUN}/samples/grid.png",
        metrics=f"{RUN}/samples/metrics.json",
    params:
        cfg=stage_cfg("sample"),
        out=f"{RUN}/samples",
    log:
        f"{LOGS}/sample.log",
    benchmark:
        f"{BENCH}/sample.tsv"
    threads: workflow.cores
    shell:
        "{PY} -m workflow.sample --config {params.cfg:q} --model {input.model} --out {params.out} > {log} 2>&1"
