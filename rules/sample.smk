rule sample:
    input:
        model=f"{RUN}/model",
        base=MODEL,
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
        "{PY} -m workflow.sample --config {params.cfg:q} --model {input.model} --base-model {input.base}"
        " --out {params.out} > {log} 2>&1"
