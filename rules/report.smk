# Figures and tables for `snakemake --report report.html`: the training curves (from log.jsonl), the
# metrics as a table, and the config the run used.
rule report_files:
    input:
        train=f"{RUN}/train.json",
        metrics=f"{RUN}/samples/metrics.json",
    output:
        curves=report(f"{RUN}/report/training.png", caption="report/training.rst", category="Training"),
        metrics=report(f"{RUN}/report/metrics.html", caption="report/metrics.rst", category="Metrics"),
        config=report(f"{RUN}/report/config.yaml", caption="report/config.rst", category="Config"),
    params:
        cfg=json.dumps(CFG.model_dump(mode="json"), sort_keys=True),
        run_dir=RUN,
        out=f"{RUN}/report",
    log:
        f"{LOGS}/report_files.log",
    benchmark:
        f"{BENCH}/report_files.tsv"
    shell:
        "{PY} -m workflow.report --config {params.cfg:q} --run-dir {params.run_dir} --out {params.out} > {log} 2>&1"
