# deepspeed-diffusers: fine-tune Stable Diffusion-style models with DeepSpeed. From the repo root:
#   snakemake -n                         what would run
#   snakemake --cores all                run it here
#   snakemake --profile profiles/local   the same, with the local profile's settings
#   snakemake --profile slurm            on a Slurm cluster (profiles/slurm)
#   snakemake --report report.html       samples, curves, metrics and config in one HTML file
# Stages: fetch_model, prepare (and prior_images) -> cache -> train -> ema -> sample, export -> report_files
# (one rules/<stage>.smk each). The config, `auto` settings and input checks: rules/common.smk.

from snakemake.utils import min_version

min_version("8.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/fetch_model.smk"
include: "rules/prepare.smk"
include: "rules/prior_images.smk"
include: "rules/cache.smk"
include: "rules/train.smk"
include: "rules/ema.smk"
include: "rules/sample.smk"
include: "rules/export.smk"
include: "rules/report.smk"


localrules:
    all,


rule all:
    input:
        f"{RUN}/samples/grid.png",
        f"{RUN}/samples/metrics.json",
        f"{RUN}/report/training.png",
        f"{RUN}/export",
