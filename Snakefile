# deepspeed-diffusers: fine-tune Stable Diffusion-style models with DeepSpeed.
#   snakemake -n                       what would run
#   snakemake --cores all              run it here
#   snakemake --profile profiles/local the same, with the local profile's settings
# Stages: fetch_model, prepare -> cache -> train -> ema -> sample (one rules/<stage>.smk each).

from snakemake.utils import min_version

min_version("8.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/fetch_model.smk"
include: "rules/prepare.smk"
include: "rules/cache.smk"
include: "rules/train.smk"
include: "rules/ema.smk"
include: "rules/sample.smk"


localrules:
    all,


rule all:
    input:
        f"{RUN}/samples/grid.png",
        f"{RUN}/samples/metrics.json",
