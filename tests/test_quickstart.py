"""README's quickstart, each command exactly as written: what reaches every stage.

Bugs these catch (each happened): every GPU command of the README training with the CPU demo's
learning rate, steps and digit prompts; a recipe stack that silently gave ZeRO-0 on a 24 GB card;
SDXL trained at SD 1.5's resolution; a real run written into the demo's run folder; the Slurm
placeholders found job by job. The GPU commands are dry-run (`-n -p`) on a machine whose
`nvidia-smi` lists the card the line is for; their models are diffusers folders of the real
families' configs (no weights: a dry-run reads configs only). Two lines also run for real on the CPU
(`make test-e2e`): the Pokémon example and DreamBooth, with tiny stand-ins in the real layouts and
only the step count lowered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from documented import copy_repo, fake_gpus, jobs, run_documented, shell_commands, stage_configs
from test_documented_commands import runs

from workflow.families import FAMILIES
from workflow.flux import write_config_folder

H100_MIB, RTX4090_MIB, RTX4060TI_MIB = 81559, 24564, 16380

Q80 = "snakemake --cores all --config model__pretrained=/models/sd15 data__source=imagefolder:/data/pets"
Q24 = ("snakemake --cores all --configfile config/cards/24gb.yaml --config model__pretrained=/models/sd15 "
       "data__source=imagefolder:/data/pets")
QXL = ("snakemake --cores all --configfile config/cards/sdxl-lora-16gb.yaml --config model__pretrained=/models/sdxl-base "
       "data__source=imagefolder:/data/pets")
QSLURM = ("snakemake --profile slurm --config slurm__nodes=2 slurm__gpus_per_node=8 model__pretrained=/models/sd15 "
          "data__source=imagefolder:/data/pets")
QDREAMBOOTH = ("snakemake --cores all --configfile config/small-data.yaml --config model__pretrained=/models/sd15 "
               "data__source=imagefolder:/data/rex data__caption=\"a photo of sks dog\" "
               "data__prior__caption=\"a photo of a dog\"")
QPOKEMON = "snakemake --cores all --config model__pretrained=/models/sd15 data__source=hf:/data/pokemon-blip-captions"
QFLUX_LORA = ("snakemake --cores all --config model__pretrained=/models/flux-dev data__source=imagefolder:/data/pets "
              "train__mode=lora")
QFLUX_SLURM = ("snakemake --profile slurm --config slurm__nodes=2 slurm__gpus_per_node=8 model__pretrained=/models/flux-dev "
               "data__source=imagefolder:/data/pets")


# ---------------------------------------------------------------- the user's folders


def config_folder(path: Path, family: str, resolution: int) -> Path:
    """A diffusers folder of a released model's configs and tokenizers, without weights."""
    from workflow.single_file import write_family_config

    return write_family_config(path, FAMILIES[family], resolution, "epsilon")


def photos(folder: Path, count: int, captions: bool) -> Path:
    """Images as a user has them: captioned by metadata.jsonl, or not at all (DreamBooth's)."""
    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        Image.new("RGB", (48 + 8 * (i % 3), 40), (40 * i % 255, 120, 200 - 10 * i)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": f"a photo of rex the dog, pose {i}"}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def pokemon_parquet(folder: Path, count: int) -> Path:
    """A local copy laid out as lambdalabs/pokemon-blip-captions is: data/train-...parquet with an
    `image` column of {bytes, path} structs and a `text` column of BLIP captions."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images, texts = [], []
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    for i in range(count):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (37 * i % 255, 90 + 20 * (i % 5), 180)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        texts.append(f"a drawing of a {colours[i % len(colours)]} pokemon with {i % 4 + 1} eyes")
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image": images, "text": texts}),
                   folder / "data" / "train-00000-of-00001-566cc9b19d7203f8.parquet")
    return folder


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user")
    return {"/models/sd15": config_folder(root / "models" / "sd15", "sd1", 512),
            "/models/sdxl-base": config_folder(root / "models" / "sdxl-base", "sdxl", 1024),
            "/models/flux-dev": write_config_folder(root / "models" / "flux-dev"),
            "/data/pets": photos(root / "data" / "pets", 4, captions=True),
            "/data/rex": photos(root / "data" / "rex", 5, captions=False),
            "/data/pokemon-blip-captions": pokemon_parquet(root / "data" / "pokemon-blip-captions", 12)}


def set_site_settings(repo: Path) -> None:
    """The Slurm profile's SITE SETTINGS edited, as the README asks before a first cluster run."""
    profile = repo / "profiles" / "slurm" / "config.yaml"
    site = yaml.safe_load(profile.read_text())
    site["default-resources"] |= {"slurm_account": "ml-team", "slurm_partition": "gpu"}
    profile.write_text(yaml.safe_dump(site))


def pick(values: dict, *keys: str) -> dict:
    return {k: values[k] for k in keys}


def placeholders(command: str, users: dict[str, Path]) -> dict[str, str]:
    return {k: str(v) for k, v in users.items() if k in command}


def dry_run(command: str, repo: Path, users: dict, gpus: Path | None = None):
    proc = run_documented(command, repo, replace=placeholders(command, users), dry_run=True,
                          path=[gpus] if gpus else [])
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def settings(proc) -> dict:
    """Per stage: the keys the quickstart promises to choose right."""
    cfg = stage_configs(proc)
    t = cfg["train"]["train"]
    return {"lr": t["lr"], "steps": t["steps"], "epochs": t["epochs"], "precision": t["precision"],
            "zero_stage": t["zero_stage"], "micro_batch": t["micro_batch"], "compile": t["compile"],
            "mode": t["mode"], "resolution": cfg["cache"]["cache"]["resolution"], "run": cfg["train"]["run"],
            "prompts": cfg["sample"]["sample"]["prompts"], "sample_batch": cfg["sample"]["sample"]["batch_size"]}


def the_same_in_every_stage(proc, *keys: str) -> None:
    """A value the Snakefile chose reaches each stage that reads it as the same value."""
    cfg = stage_configs(proc)
    for key in keys:
        section, leaf = key.split(".")
        values = {stage: c[section][leaf] for stage, c in cfg.items() if section in c and leaf in c[section]}
        assert len(set(map(json.dumps, values.values()))) == 1, (key, values)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("quickstart") / "repo")


@runs(Q80)
def test_sd15_on_one_80gb_gpu(repo, users, tmp_path):
    proc = dry_run(Q80, repo, users, fake_gpus(tmp_path / "bin", 1, H100_MIB))
    got = settings(proc)
    assert got == {"lr": 1e-5, "steps": "auto", "epochs": "auto", "precision": "bf16-mixed", "zero_stage": 0,
                   "micro_batch": 64, "compile": True, "mode": "full", "resolution": 512, "run": "pets-sd15",
                   "prompts": "auto", "sample_batch": got["sample_batch"]}, got
    assert isinstance(got["sample_batch"], int) and got["sample_batch"] >= 1
    assert jobs(proc) == {"prepare", "fetch_model", "cache", "train", "ema", "sample", "export", "report_files", "all"}
    assert "--run-dir results/runs/pets-sd15" in " ".join(shell_commands(proc, "train"))
    assert "train.lr = 1e-05  (sd1 full: diffusers' text_to_image examples)" in proc.stderr  # printed when read
    the_same_in_every_stage(proc, "train.lr", "cache.resolution", "train.precision")


@runs(Q24)
def test_sd15_on_one_24gb_gpu(repo, users, tmp_path):
    gpus = fake_gpus(tmp_path / "bin", 1, RTX4090_MIB, "NVIDIA GeForce RTX 4090")
    proc = dry_run(Q24, repo, users, gpus)
    got = settings(proc)
    assert {k: got[k] for k in ("lr", "precision", "zero_stage", "micro_batch", "compile", "resolution", "run")} == \
        {"lr": 1e-5, "precision": "bf16", "zero_stage": 2, "micro_batch": 16, "compile": True, "resolution": 512,
         "run": "pets-sd15"}
    t = stage_configs(proc)["train"]
    assert (t["train"]["grad_accum"], t["train"]["gradient_checkpointing"], t["train"]["expandable_segments"],
            t["ema"]["offload"], t["recipe"]["card_gb"]) == (4, ["down_blocks.0", "up_blocks.3"], True, "cpu", 24)
    # the same card without its recipe: told which to add, before anything runs
    bare = run_documented(Q80, repo, replace=placeholders(Q80, users), dry_run=True, path=[gpus])
    assert bare.returncode != 0 and "GPUs have 24 GB; the automatic settings" in bare.stderr + bare.stdout
    assert "config/cards/" in bare.stderr + bare.stdout


@runs(QXL)
def test_sdxl_lora_on_one_16gb_gpu(repo, users, tmp_path):
    proc = dry_run(QXL, repo, users, fake_gpus(tmp_path / "bin", 1, RTX4060TI_MIB, "NVIDIA GeForce RTX 4060 Ti"))
    got = settings(proc)
    assert {k: got[k] for k in ("lr", "precision", "zero_stage", "micro_batch", "compile", "mode", "resolution",
                                "run")} == {"lr": 1e-4, "precision": "bf16", "zero_stage": 2, "micro_batch": 8,
                                            "compile": False, "mode": "lora", "resolution": 1024,
                                            "run": "pets-sdxl-base-lora"}
    cfg = stage_configs(proc)
    assert cfg["train"]["train"]["gradient_checkpointing"] is True and cfg["cache"]["cache"]["batch_size"] == 8
    # sampling follows the 16 GB card, not the 80 GB default
    eighty = settings(dry_run(QXL.replace("--configfile config/cards/sdxl-lora-16gb.yaml ", ""), repo, users,
                              fake_gpus(tmp_path / "big", 1, H100_MIB)))
    assert got["sample_batch"] <= eighty["sample_batch"]
    # an SD 1.5 recipe for this SDXL model: refused, naming the mismatch
    wrong = run_documented(QXL.replace("sdxl-lora-16gb", "lora-16gb"), repo, replace=placeholders(QXL, users),
                           dry_run=True, path=[tmp_path / "bin"])
    assert wrong.returncode != 0 and "measured for sd1 and sd2 models, not for this sdxl model" in wrong.stdout + wrong.stderr


@runs(QSLURM)
def test_slurm_two_nodes_of_eight_gpus(tmp_path, users):
    """From the login node (no GPU): the GPU settings come from the slurm: geometry, 16 ranks. As
    shipped, the profile's placeholder account stops it before anything is submitted."""
    repo = copy_repo(tmp_path / "repo")
    shipped = run_documented(QSLURM, repo, replace=placeholders(QSLURM, users), dry_run=True)
    assert shipped.returncode != 0 and "slurm_account is still the placeholder 'my_account'" in shipped.stdout + shipped.stderr
    set_site_settings(repo)
    proc = dry_run(QSLURM, repo, users)
    got = settings(proc)
    assert {k: got[k] for k in ("lr", "precision", "zero_stage", "micro_batch", "compile", "resolution", "run")} == \
        {"lr": 1e-5, "precision": "bf16", "zero_stage": 2, "micro_batch": 64, "compile": True, "resolution": 512,
         "run": "pets-sd15"}
    train = " ".join(shell_commands(proc, "train"))
    assert "srun --nodes=2 --ntasks-per-node=8 --gres=gpu:8" in train and "--preflight 16" in train
    assert "Slurm: 2 node(s) x 8 GPU(s)" in proc.stderr


@runs(QDREAMBOOTH)
def test_dreambooth_from_a_few_photos(repo, users, tmp_path):
    proc = dry_run(QDREAMBOOTH, repo, users, fake_gpus(tmp_path / "bin", 1, H100_MIB))
    got = settings(proc)
    assert {k: got[k] for k in ("lr", "mode", "micro_batch", "resolution", "run", "prompts", "steps")} == \
        {"lr": 1e-4, "mode": "lora", "micro_batch": 8, "resolution": 512, "run": "rex-sd15-lora", "prompts": "auto",
         "steps": "auto"}
    cfg = stage_configs(proc)
    assert "prior_images" in jobs(proc)  # the class images, sampled from the base model
    prior = cfg["prior_images"]["data"]["prior"]
    assert (prior["source"], prior["caption"], prior["count"]) == ("generate", "a photo of a dog", 100)
    assert cfg["prepare"]["data"]["caption"] == "a photo of sks dog" and cfg["prepare"]["data"]["prior"]["source"] is None
    assert (cfg["train"]["train"]["caption_dropout"], cfg["train"]["train"]["lora"]["rank"]) == (0.0, 8)
    assert "--prior results/prior/sd15/a-photo-of-a-dog-n100-s0-" in " ".join(shell_commands(proc, "cache"))


@runs(QPOKEMON)
def test_pokemon_example_on_one_80gb_gpu(repo, users, tmp_path):
    proc = dry_run(QPOKEMON, repo, users, fake_gpus(tmp_path / "bin", 1, H100_MIB))
    got = settings(proc)
    assert {k: got[k] for k in ("lr", "precision", "zero_stage", "micro_batch", "resolution", "run", "prompts")} == \
        {"lr": 1e-5, "precision": "bf16-mixed", "zero_stage": 0, "micro_batch": 64, "resolution": 512,
         "run": "pokemon-blip-captions-sd15", "prompts": "auto"}
    assert stage_configs(proc)["prepare"]["data"]["source"] == f"hf:{users['/data/pokemon-blip-captions']}"


@runs(QFLUX_LORA)
def test_flux_lora_on_one_80gb_gpu(repo, users, tmp_path):
    """FLUX.1-dev LoRA: the family's settings, not SD's (bugs caught: SD's micro-batch 64 at 1024 px, the
    frozen 12 B base kept in fp32 by bf16-mixed, DDIM sampling of a flow model); without LoRA the same
    card is told at dry-run that a full fine-tune's states do not fit, with what would."""
    gpus = fake_gpus(tmp_path / "bin", 1, H100_MIB)
    proc = dry_run(QFLUX_LORA, repo, users, gpus)
    got = settings(proc)
    assert pick(got, "lr", "precision", "zero_stage", "micro_batch", "compile", "mode", "resolution", "run") == {
        "lr": 1e-4, "precision": "bf16", "zero_stage": 0, "micro_batch": 1, "compile": False, "mode": "lora",
        "resolution": 1024, "run": "pets-flux-dev-lora"}
    cfg = stage_configs(proc)
    assert cfg["train"]["train"]["gradient_checkpointing"] is True and cfg["sample"]["sample"]["scheduler"] == "auto"
    full = QFLUX_LORA.replace(" train__mode=lora", "")
    refused = run_documented(full, repo, replace=placeholders(full, users), dry_run=True, path=[gpus])
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "11.9 B-parameter model holds about 177 GiB" in out and "ZeRO-3 on" in out


@runs(QFLUX_SLURM)
def test_flux_full_fine_tune_on_two_nodes_of_eight_gpus(tmp_path, users):
    """FLUX.1-dev full fine-tune over 16 GPUs: ZeRO-2 bf16 (32 GiB of states per 80 GB card), micro-batch 1
    with every block recomputed, FLUX's full rate."""
    repo = copy_repo(tmp_path / "repo")
    set_site_settings(repo)
    proc = dry_run(QFLUX_SLURM, repo, users)
    got = settings(proc)
    assert pick(got, "lr", "precision", "zero_stage", "micro_batch", "mode", "resolution", "run") == {
        "lr": 1e-5, "precision": "bf16", "zero_stage": 2, "micro_batch": 1, "mode": "full", "resolution": 1024,
        "run": "pets-flux-dev"}
    assert "srun --nodes=2 --ntasks-per-node=8 --gres=gpu:8" in " ".join(shell_commands(proc, "train"))


# ---------------------------------------------------------------- for real on the CPU (make test-e2e)


@pytest.fixture(scope="module")
def stand_ins(built, tmp_path_factory, users) -> dict[str, Path]:
    """The tiny model laid out like stable-diffusion-v1-5 (safety checker, fp16 variants, .bin text
    encoder) where the user's /models/sd15 is; the user's data as above."""
    from sd15_layout import sd15_layout

    root = tmp_path_factory.mktemp("stand-ins")
    return users | {"/models/sd15": sd15_layout(built["model"], root / "sd15")}


@pytest.mark.e2e
@pytest.mark.long(6)
def test_pokemon_example_runs_end_to_end_on_the_cpu(stand_ins, tmp_path):
    """The README's Pokémon line as written (tiny stand-ins, 12 steps): every stage runs, the samples
    are the data set's own captions, each row beside its image, and the files for other tools load."""
    repo = copy_repo(tmp_path / "repo")
    proc = run_documented(QPOKEMON, repo, replace=placeholders(QPOKEMON, stand_ins), append="train__steps=12",
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = repo / "results" / "runs" / "pokemon-blip-captions-sd15"
    result = json.loads((run / "train.json").read_text())
    assert (result["final_step"], result["lr"], result["precision"], result["zero_stage"]) == (12, 1e-5, "fp32", 0)
    metrics = json.loads((run / "samples" / "metrics.json").read_text())
    captions = {f"a drawing of a {c} pokemon with {n} eyes" for c in ("red", "blue", "green", "yellow", "purple",
                                                                       "orange") for n in range(1, 5)}
    assert metrics["prompt_list"] and set(metrics["prompt_list"]) <= captions, metrics["prompt_list"]
    assert metrics["reference_images"] == len(metrics["prompt_list"]) and "digit_accuracy" not in metrics
    assert (run / "samples" / "grid.png").is_file() and (run / "export" / "pokemon-blip-captions-sd15.safetensors").is_file()


@pytest.mark.e2e
@pytest.mark.long(8)
def test_dreambooth_runs_end_to_end_on_the_cpu(stand_ins, tmp_path):
    """The README's DreamBooth line as written (tiny stand-ins, 10 steps): 100 class images are
    sampled from the base model, cached beside the subject's, and mixed into training; a second run
    of another subject of the same class reuses them."""
    repo = copy_repo(tmp_path / "repo")
    proc = run_documented(QDREAMBOOTH, repo, replace=placeholders(QDREAMBOOTH, stand_ins), append="train__steps=10",
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (prior,) = (repo / "results" / "prior" / "sd15").iterdir()
    manifest = json.loads((prior / "manifest.json").read_text())
    assert (manifest["count"], manifest["generated"]["caption"]) == (100, "a photo of a dog")
    run = repo / "results" / "runs" / "rex-sd15-lora"
    result = json.loads((run / "train.json").read_text())
    assert (result["final_step"], result["mode"], result["prior_per_micro_batch"]) == (10, "lora", 4)
    metrics = json.loads((run / "samples" / "metrics.json").read_text())
    assert metrics["prompt_list"] == ["a photo of sks dog", "a photo of a dog"]
    another_dog = QDREAMBOOTH.replace("imagefolder:/data/rex", "imagefolder:/data/pets")
    other = run_documented(another_dog, repo, replace=placeholders(another_dog, stand_ins), dry_run=True)
    assert other.returncode == 0 and "prior_images" not in jobs(other), other.stdout[-2000:]
