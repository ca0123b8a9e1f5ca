# DreamBooth's class images, when data.prior.source is `generate`: sampled from the base model from
# data.prior.caption, in a folder per model, caption, count and seed (and sampling settings), so a
# second run with the same ones reuses them. Prepared like a data set; `cache` takes them from here.
if PRIOR:

    rule prior_images:
        input:
            model=MODEL,
        output:
            manifest=f"{PRIOR}/manifest.json",
        params:
            cfg=stage_cfg("prior_images"),
            out=PRIOR,
        log:
            f"logs/prior/{CFG.model_name}/{CFG.prior_dir_name}.log",
        benchmark:
            f"benchmarks/prior/{CFG.model_name}/{CFG.prior_dir_name}.tsv"
        threads: job_cores()
        resources:
            **gpu_job(1, SLURM.sample_minutes),
        shell:
            "{PY} -m workflow.prior_images --config {params.cfg:q} --model {input.model} --out {params.out} > {log} 2>&1"
