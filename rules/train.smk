# Checkpoints (RUN/checkpoints/) are deliberately not an output: Snakemake deletes outputs before
# rerunning a job, and a rerun must resume from them.
rule train:
    input:
        latents=f"{LATENTS}/manifest.json",
        data=f"{DATA}/manifest.json",
        model=MODEL,
    output:
        f"{RUN}/train.json",
    params:
        cfg=stage_cfg("train"),
        latents=LATENTS,
        data=DATA,
        run_dir=RUN,
    log:
        f"{LOGS}/train.log",
    benchmark:
        f"{BENCH}/train.tsv"
    threads: max(train_procs(), 1)
    shell:
        "{PY} -m workflow.train --config {params.cfg:q} --latents {params.latents} --data {params.data}"
        " --model {input.model} --run-dir {params.run_dir} > {log} 2>&1"
