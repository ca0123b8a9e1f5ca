# Checkpoints (RUN/checkpoints/) are deliberately not an output: Snakemake deletes outputs before
# rerunning a job, and a rerun must resume from them.
#
# Inside a Slurm job with several ranks, the ranks are srun tasks (one per GPU, on every node);
# the executor's jobstep strips SLURM_* from this shell, so the geometry is passed to srun here and
# each task maps SLURM_PROCID/LOCALID/NTASKS to its rank (DSD_RANKS_FROM=slurm). Elsewhere the
# stage starts its own local ranks. The preflight (cache fingerprint, resumability) runs once first.
# `exec` makes Snakemake the stage's parent: if Snakemake is killed, the stage sees it, saves a
# checkpoint and exits (--stop-with-parent) instead of training on unseen.
rule train:
    input:
        latents=f"{LATENTS}/manifest.json",
        data=f"{DATA}/manifest.json",
        model=MODEL,
    output:
        f"{RUN}/train.json",
    params:
        cfg=stage_cfg("train"),
        args=f"--latents {LATENTS} --data {DATA} --model {MODEL} --run-dir {RUN}",
        ranks=train_ranks(),
        srun=(
            f"srun --nodes={SLURM.nodes} --ntasks-per-node={SLURM.gpus_per_node} --gres=gpu:{SLURM.gpus_per_node}"
            f" --cpus-per-task={SLURM.cpus_per_gpu} --kill-on-bad-exit=1"
        ),
    log:
        f"{LOGS}/train.log",
    benchmark:
        f"{BENCH}/train.tsv"
    threads: train_threads()
    resources:
        **train_job(),
    shell:
        """
        if [ -n "${{SLURM_JOB_ID:-}}" ] && [ {params.ranks} -gt 1 ]; then
            {PY} -m workflow.train --config {params.cfg:q} {params.args} --preflight {params.ranks} > {log} 2>&1
            DSD_RANKS_FROM=slurm {params.srun} {PY} -m workflow.train --config {params.cfg:q} {params.args} >> {log} 2>&1
        else
            exec {PY} -m workflow.train --config {params.cfg:q} {params.args} --stop-with-parent > {log} 2>&1
        fi
        """
