import pytest
import yaml

from workflow.config import (Config, ConfigError, load_config, load_config_files, nest_dotted, stage_config,
                             validate)

from conftest import REPO


def test_default_config_file_matches_typed_defaults():
    # config.yaml documents every key; it must hold exactly the typed defaults.
    assert load_config(REPO / "config.yaml") == Config()
    written = yaml.safe_load((REPO / "config.yaml").read_text())
    assert _keys(written) == _keys(Config().model_dump(mode="json")), "config.yaml must list every key"


def test_card_recipes_compose_or_name_the_conflict():
    """Bugs caught: two card recipes laid over each other silently mixing (the later one's micro-batch
    with the earlier one's offload), and a later config file quietly changing a measured recipe key
    (config/small-data.yaml's micro-batch 8 over an 8 GB card's 2 runs out of memory on that card)."""
    def layered(*names, overrides=()):
        return load_config_files([REPO / "config.yaml", *(REPO / "config" / name for name in names)], list(overrides))

    card = layered("cards/24gb.yaml")
    assert (card.recipe.name, card.recipe.card_gb, card.train.zero_stage, card.train.precision) == ("24gb", 24, 2, "bf16")
    with pytest.raises(ConfigError, match="two card recipes in one run: .*24gb.yaml.*lora-16gb.yaml"):
        layered("cards/24gb.yaml", "cards/lora-16gb.yaml")
    with pytest.raises(ConfigError, match="small-data.yaml changes train.lora.rank, train.micro_batch of the card recipe .*sdxl-lora-8gb"):
        layered("cards/sdxl-lora-8gb.yaml", "small-data.yaml")
    recipe_last = layered("small-data.yaml", "cards/sdxl-lora-8gb.yaml",  # the card's measured settings win
                          overrides=["data.prior.caption=a photo of a dog"])
    assert (recipe_last.train.micro_batch, recipe_last.data.prior.source) == (2, "generate")
    # a key set by name on the command line is the user's choice
    assert layered("cards/24gb.yaml", overrides=["train.micro_batch=8"]).train.micro_batch == 8


def test_errors_name_the_layer_suggest_the_key_and_show_the_list_syntax(tmp_path):
    """Bugs caught: 'unknown key' with no hint for another trainer's name (learning_rate), an error
    that does not say which file set the bad value, and a list given as a plain string ('a photo')
    answered with 'Input should be a valid list' and no example."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  learning_rate: 1.0e-4\n  zero_stage: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config_files([REPO / "config.yaml", mine], ["sample.prompts=a photo of rex", "train.lora.rnak=4"])
    text = str(e.value)
    assert f"train.learning_rate: unknown key; did you mean train.lr? (got 0.0001) [{mine}]" in text
    assert f"train.zero_stage: Input should be 0, 1, 2, 3 or 'auto' (got 5) [{mine}]" in text
    assert "train.lora.rnak: unknown key; did you mean train.lora.rank?" in text and "[--set]" in text
    assert """sample__prompts='["a photo of rex"]'""" in text
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=f"{bad_yaml}:3:1: not valid YAML"):
        load_config_files([bad_yaml])
    with pytest.raises(ConfigError, match="gpu.yaml was removed; GPU settings are chosen"):
        load_config_files([REPO / "config" / "gpu.yaml"])


def _keys(node, prefix=""):
    if isinstance(node, dict) and node:
        return {k for key, sub in node.items() for k in _keys(sub, f"{prefix}.{key}" if prefix else key)}
    return {prefix}


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.bogus=1", "train.bogus"),
        ("train.channels_last=true", "train.channels_last"),  # a removed key: named, with why
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.lr=-1", "train.lr"),
        ("train.micro_batch=0", "train.micro_batch"),
        ("train.steps=ten", "train.steps"),
        ("train.precision=fp8", "train.precision"),
        ("data.source=s3://bucket", "data.source"),
        ("run=bad/name", "run"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "config.yaml", [override])
    assert f"  {key}:" in str(e.value)


def test_overrides_parse_as_yaml_and_merge():
    cfg = load_config(REPO / "config.yaml", ["train.steps=10", "sample.seeds=[1, 2]", "train.lr=3e-4"])
    assert cfg.train.steps == 10 and cfg.sample.seeds == [1, 2] and cfg.train.lr == 3e-4
    assert cfg.train.micro_batch == Config().train.micro_batch  # siblings untouched
    with pytest.raises(ConfigError, match="train.steps .* and train.epochs .* are both set"):
        load_config(REPO / "config.yaml", ["train.steps=10", "train.epochs=3"])


def test_dotted_keys_merge_into_sections_in_any_order():
    assert nest_dotted({"train.steps": 5, "train": {"lr": 0.1}}) == {"train": {"steps": 5, "lr": 0.1}}
    assert nest_dotted({"train": {"lr": 0.1}, "train.steps": 5}) == {"train": {"lr": 0.1, "steps": 5}}


def test_flattened_keys_beat_the_nested_value_whatever_the_order():
    """Snakemake starts from the --config keys and merges config.yaml into them, so the flattened
    override arrives *before* the section it overrides. It used to lose there (700 steps trained
    for train__steps=1000)."""
    section = {"steps": 700, "lr": 0.1, "lora": {"rank": 8, "alpha": None}}
    for flat in ({"train__steps": 5, "train__lora__rank": 4}, {"train__lora__rank": 4, "train.steps": 5}):
        for raw in ({**flat, "train": section}, {"train": section, **flat}):
            assert nest_dotted(raw) == {"train": {"steps": 5, "lr": 0.1, "lora": {"rank": 4, "alpha": None}}}, raw
    # a deeper flattened key beats a shallower one that sets the same leaf
    assert nest_dotted({"train__lora__rank": 4, "train__lora": {"rank": 2}})["train"]["lora"]["rank"] == 4
    with pytest.raises(ConfigError, match="train.zero_stage"):
        validate({"train__zero_stage": 4, **yaml.safe_load((REPO / "config.yaml").read_text())})


def test_command_line_null_is_null():
    """`--config model__name=null` reaches us as the string 'null' (Snakemake's YAML base loader):
    it must mean null, not a model folder named 'null'."""
    raw = {"model__name": "null", "sample__resolution": "~", "sample__negative_prompt": "a null hypothesis",
           **yaml.safe_load((REPO / "config.yaml").read_text())}
    raw["model"]["name"] = "mine"
    cfg = validate(raw)
    assert cfg.model.name is None and cfg.sample.resolution is None
    assert cfg.sample.negative_prompt == "a null hypothesis"


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config("nope.yaml")


def test_stage_config_only_carries_what_the_stage_reads():
    cfg = Config()
    assert set(stage_config(cfg, "prepare")) == {"data"}
    assert stage_config(cfg, "train")["sample"] == {"checkpoints": []}  # only what checkpoint pruning keeps
    # a train-only change does not change what cache sees (so cache is not rerun)
    changed = load_config(REPO / "config.yaml", ["train.steps=7"])
    assert stage_config(changed, "cache") == stage_config(cfg, "cache")
    assert stage_config(changed, "train") != stage_config(cfg, "train")
    # train.seed places random crops, so it reaches the cache stage only when crops are random
    reseeded = load_config(REPO / "config.yaml", ["train.seed=5"])
    assert stage_config(reseeded, "cache") == stage_config(cfg, "cache")
    random_crop = ["cache.center_crop=false"]
    assert stage_config(load_config(REPO / "config.yaml", random_crop + ["train.seed=5"]), "cache") != \
        stage_config(load_config(REPO / "config.yaml", random_crop), "cache")


def test_derived_names():
    """Bug caught: a real run after the demo landing in results/runs/digits-tiny (run stayed the demo's)."""
    cfg = load_config(None, ["data.source=imagefolder:/data/my pets/", "model.pretrained=/models/sd15"])
    assert cfg.dataset_name == "my-pets"
    assert cfg.model_name == "sd15"
    assert Config().model_name == "tiny-digits"
    assert (Config().auto_run_name, cfg.auto_run_name) == ("digits-tiny", "my-pets-sd15")
    lora = load_config(None, ["data.source=hf:/data/pokemon", "model.pretrained=/m/v1-5-pruned.safetensors",
                              "train.mode=lora"])
    assert lora.auto_run_name == "pokemon-v1-5-pruned-lora"
    generated = load_config(None, ["data.source=imagefolder:/data/rex", "data.caption=a photo of sks dog",
                                   "data.prior.source=generate", "data.prior.caption=a photo of a dog"])
    assert generated.prepared_name == "rex" and generated.dataset_name.startswith("rex+prior-generated-")
    assert generated.prior_dir_name.startswith("a-photo-of-a-dog-n100-s0-")
    more = load_config(None, ["data.source=imagefolder:/data/rex", "data.prior.source=generate",
                              "data.prior.caption=a photo of a dog", "data.prior.count=200"])
    assert more.dataset_name != generated.dataset_name and more.prior_dir_name != generated.prior_dir_name
    with pytest.raises(ConfigError, match="data.prior.source generate samples the prior images from data.prior.caption"):
        load_config(None, ["data.prior.source=generate"])


def test_auto_resolution_is_the_models_own(tmp_path):
    """Bug caught: an SD 2.x-768 (or SDXL) folder cached at a fixed default size (32, or gpu.yaml's
    512) instead of its own, and the cache folder name not saying which size it holds."""
    import json

    sd2_768 = tmp_path / "sd2-768"
    for part, conf in {"unet": {"sample_size": 96, "block_out_channels": [320, 640, 1280, 1280]},
                       "vae": {"block_out_channels": [128, 256, 512, 512]}}.items():
        (sd2_768 / part).mkdir(parents=True)
        (sd2_768 / part / "config.json").write_text(json.dumps(conf))
    (sd2_768 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cfg = load_config(REPO / "config.yaml", [f"model.pretrained={sd2_768}"])
    assert cfg.cache.resolution == "auto"
    assert cfg.at_model_resolution(sd2_768).cache.resolution == 768
    assert cfg.encoder_key.endswith("_768px")
    assert load_config(REPO / "config.yaml").encoder_key == "tiny-digits_32px"  # builtins: known before building
    assert load_config(REPO / "config.yaml", ["model.pretrained=builtin:sdxl-arch"]).encoder_key.endswith("_1024px")
    assert load_config(REPO / "config.yaml", ["model.pretrained=org/some-model"]).encoder_key.endswith("_autopx")
    fixed = load_config(REPO / "config.yaml", [f"model.pretrained={sd2_768}", "cache.resolution=640"])
    assert fixed.at_model_resolution(sd2_768).cache.resolution == 640 and fixed.encoder_key.endswith("_640px")
    with pytest.raises(ConfigError, match="cache.resolution"):
        load_config(REPO / "config.yaml", ["cache.resolution=4"])
