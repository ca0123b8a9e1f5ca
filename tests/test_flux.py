"""FLUX.1 (builtin:tiny-flux) through every stage, held to what diffusers' FluxPipeline itself
computes and loads: its prompt encoding, its latent packing and position ids, its scheduler's sigma
shift, FluxPipeline.from_pretrained and load_lora_weights on what the merge writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workflow.families import FAMILIES, family_of
from workflow.latents import LatentStream

from conftest import built_with, run_stage, shared_once, tiny_config
from documented import copy_repo, run_documented
from test_documented_commands import runs
from test_train import check_killed_run_resumes_bitwise, final_weights

FLUX = ["model.pretrained=builtin:tiny-flux"]
# docs/models.md's FLUX lines
TINY_FLUX = "snakemake --cores all --config model__pretrained=builtin:tiny-flux run=digits-flux"
TINY_FLUX_BUCKETS = ("snakemake --cores all --config model__pretrained=builtin:tiny-flux data__source=builtin:digits-aspect "
                     "cache__buckets=auto cache__resolution=40 'sample__resolution=[48x32,32x48]' train__steps=450 "
                     "run=digits-flux-buckets")


def flux_config(*extra: str):
    return tiny_config(*FLUX, *extra)


@pytest.fixture(scope="session")
def flux_built(built, tmp_path_factory) -> dict[str, Path]:
    """builtin:tiny-flux fetched and cached on the shared prepared digits."""
    return built_with(flux_config(), built, tmp_path_factory, "flux-built")


def run_through(flux_built, run_dir: Path, *overrides: str) -> None:
    """train (2 ranks) -> ema -> sample, as the rules call them."""
    cfg = flux_config(*overrides)
    model, latents = str(flux_built["model"]), str(flux_built["latents"])
    run_stage("train", cfg, "--latents", latents, "--model", model, "--data", str(flux_built["data"]),
              "--run-dir", str(run_dir))
    run_stage("ema", cfg, "--model", model, "--run-dir", str(run_dir), "--out", str(run_dir / "model"))
    run_stage("sample", cfg, "--model", str(run_dir / "model"), "--base-model", model, "--latents", latents,
              "--run-dir", str(run_dir), "--out", str(run_dir / "samples"))


@pytest.fixture(scope="session")
def flux_runs(flux_built, tmp_path_factory) -> dict[str, Path]:
    """A full ZeRO-3 run and a LoRA ZeRO-2 run, 2 ranks each, through merge and sampling."""
    def build(root: Path) -> None:
        run_through(flux_built, root / "full-z3", "train.zero_stage=3", "sample.seeds=[0, 1]")
        run_through(flux_built, root / "lora-z2", "train.mode=lora", "train.zero_stage=2", "ema.use=false",
                    "sample.seeds=[0, 1]")

    root = shared_once(tmp_path_factory, "flux-runs", build)
    return {"full": root / "full-z3", "lora": root / "lora-z2"}


def test_tiny_flux_is_a_flux_folder(flux_built, tmp_path):
    """The family is read from the folder (bug caught: a FLUX folder, which has text_encoder_2, read
    as SDXL and refused for lacking unet/), and a FLUX folder missing its transformer is named so."""
    from diffusers import FluxPipeline

    from workflow.inputs import check_model_dir

    family = family_of(flux_built["model"])
    assert family.name == "flux" and family.denoiser == "transformer"
    # cache and sample on a GPU in bf16: T5-XXL and the FLUX transformer overflow in SD's fp16
    assert family.inference_dtype(torch.device("cuda")) == torch.bfloat16
    assert FAMILIES["sd1"].inference_dtype(torch.device("cuda")) == torch.float16
    # training on a GPU leaves cuDNN's attention out (its FLUX backward failed on an H100); the CPU as it is
    assert torch.backends.cuda.cudnn_sdp_enabled()
    try:
        assert "without cuDNN" in family.configure_attention(torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    pipe = FluxPipeline.from_pretrained(flux_built["model"])
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    assert pipe.vae.config.shift_factor is not None  # fitted, as FLUX's VAE has one
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in flux_built["model"].iterdir():
        if item.name != "transformer":
            (broken / item.name).symlink_to(item)
    with pytest.raises(FileNotFoundError, match="missing transformer/"):
        check_model_dir(broken)


def test_flux_cache_holds_what_flux_pipeline_encodes(flux_built):
    """Cached text is FluxPipeline.encode_prompt's: T5's last hidden states and CLIP's pooled output
    (bugs caught: CLIP's hidden states in place of T5's, the projected instead of the pooled output,
    T5 padded to another length than sampling uses); the null caption is the encoded empty caption,
    what the pipeline's negative prompt "" gives under true guidance."""
    from diffusers import FluxPipeline

    from workflow.latents import decode_latent_sample
    from workflow.shards import iter_shard

    manifest = json.loads((flux_built["latents"] / "manifest.json").read_text())
    assert manifest["family"] == "flux" and manifest["latent_shape"] == [16, 8, 8]
    assert manifest["text_shape"] == [16, 64] and manifest["pooled_shape"] == [64]
    stored = next(iter_shard(flux_built["latents"] / manifest["shards"][0]["name"]))
    cached = decode_latent_sample(stored)
    pipe = FluxPipeline.from_pretrained(flux_built["model"])
    length = FAMILIES["flux"].sample_kwargs(pipe, flux_config().sample, 1)["max_sequence_length"]
    text, pooled, _ = pipe.encode_prompt(cached["meta"]["captions"][0], None, max_sequence_length=length)
    torch.testing.assert_close(cached["text"][0].float(), text[0], atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(cached["pooled"][0].float(), pooled[0], atol=2e-3, rtol=2e-3)
    stream = LatentStream(flux_built["latents"], seed=0)
    null_text, null_pooled, _ = pipe.encode_prompt("", None, max_sequence_length=length)
    torch.testing.assert_close(stream.null_text, null_text[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stream.null_pooled, null_pooled[0], atol=2e-3, rtol=2e-3)


def test_training_sigmas_are_shifted_as_the_sampler_shifts_them(flux_built):
    """The flow objective's shift is the one FluxPipeline's scheduler applies at this resolution (bug
    caught: training on unshifted sigmas while sampling shifts them by e^mu), noising and target are
    rectified flow's, and a fixed train.flow_shift overrides the scheduler's."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    pipe = FluxPipeline.from_pretrained(flux_built["model"])
    objective = FAMILIES["flux"].objective(flux_built["model"], None, flux_config().train)
    steps, shape = 8, (16, 8, 8)
    c = pipe.scheduler.config
    mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    ours = objective.shifted(torch.linspace(1.0, 1 / steps, steps), objective.shift(shape))
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].float(), ours, atol=1e-5, rtol=1e-5)
    assert objective.shift(shape) != 1.0  # the check above would pass trivially without a shift

    x0, noise, s = torch.randn(3, *shape), torch.randn(3, *shape), torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(objective.noisy(x0, noise, s), torch.stack([x0[0], (x0[1] + noise[1]) / 2, noise[2]]))
    torch.testing.assert_close(objective.target(x0, noise, s), noise - x0)
    fixed = FAMILIES["flux"].objective(flux_built["model"], None, flux_config("train.flow_shift=3.0").train)
    assert fixed.shift(shape) == 3.0
    drawn = fixed.random_timesteps(4096, torch.Generator().manual_seed(0), torch.device("cpu"), shape)
    assert 0 < drawn.min() and drawn.max() < 1 and drawn.median() > 0.6  # logit-normal around 0.5, shifted up


def test_predict_is_flux_pipelines_transformer_call(flux_built):
    """Family.predict packs latents into 2x2 patches with the pipeline's position ids and passes the
    sigma as the timestep, as FluxPipeline does, and unpacks to the latent layout (bugs caught: patch
    order differing from the pipeline's, so the model learns a shuffled image; the timestep x1000
    twice)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_built["model"])
    gen = torch.Generator().manual_seed(0)
    noisy, text, pooled = torch.randn(2, 16, 8, 12, generator=gen), torch.randn(2, 16, 64, generator=gen), torch.randn(2, 64, generator=gen)
    sigma = torch.tensor([0.3, 0.9])
    ours = FAMILIES["flux"].predict(pipe.transformer, noisy, sigma, text, pooled, None, torch.float32)
    packed = pipe._pack_latents(noisy, 2, 16, 8, 12)
    theirs = pipe.transformer(hidden_states=packed, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=text,
                              txt_ids=torch.zeros(16, 3), img_ids=pipe._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32),
                              return_dict=False)[0]
    # the pipeline unpacks image sizes: 8x12 latents are 32x48 px at the tiny VAE's 4x
    torch.testing.assert_close(ours, pipe._unpack_latents(theirs, 8 * 4, 12 * 4, 4))


def test_flux_only_settings_are_refused_for_what_they_do_not_fit(flux_built):
    """Settings of the DDPM families are errors on FLUX, not silently ignored (bugs caught: min-SNR
    weights computed from a schedule FLUX has not, a DDIM sampler on a flow model), and a recompute
    list diffusers cannot honour is refused."""
    from diffusers import FluxPipeline

    from workflow.models import checkpointed_blocks, load_denoiser

    flux = FAMILIES["flux"]
    with pytest.raises(ValueError, match="flow-matching velocity"):
        flux.objective(flux_built["model"], "epsilon")
    with pytest.raises(ValueError, match="train.snr_gamma"):
        flux.objective(flux_built["model"]).snr_weights(torch.zeros(1), 5.0)
    with pytest.raises(ValueError, match="sample.scheduler=auto"):
        flux.set_sampler(FluxPipeline.from_pretrained(flux_built["model"]), "ddim")
    model = load_denoiser(flux_built["model"])
    with pytest.raises(ValueError, match="all of its blocks or none"):
        flux.set_checkpointing(model, ["transformer_blocks.0"])
    flux.set_checkpointing(model, checkpointed_blocks(flux_built["model"], True))
    assert model.gradient_checkpointing
    with pytest.raises(ValueError, match="timestep_sampling"):
        FAMILIES["sd1"].objective(flux_built["model"], None, flux_config("train.timestep_sampling=logit_normal").train)


@pytest.mark.flux
def test_flux_full_zero3_and_lora_zero2_merge_into_folders_diffusers_loads(flux_built, flux_runs):
    """2 ranks each. Full ZeRO-3: the merged folder is a FluxPipeline whose transformer holds the
    trained EMA weights (the raw ones in transformer_raw/). LoRA ZeRO-2: the adapter file loads with
    FluxPipeline.load_lora_weights onto the base (bug caught: the adapter saved under unet_lora_layers,
    which FLUX's loader ignores) and changes its output; both sample."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    full, lora = flux_runs["full"], flux_runs["lora"]
    pipe = FluxPipeline.from_pretrained(full / "model")
    base = FluxTransformer2DModel.from_pretrained(flux_built["model"], subfolder="transformer")
    raw = FluxTransformer2DModel.from_pretrained(full / "model", subfolder="transformer_raw")
    trained = dict(pipe.transformer.named_parameters())
    unmoved = [n for n, p in base.named_parameters() if torch.equal(p, trained[n])]
    assert not unmoved, f"ZeRO-3 shards merged incompletely: {unmoved[:5]}"  # every tensor trained moved
    assert any(not torch.equal(p, trained[n]) for n, p in raw.named_parameters())  # EMA differs from raw
    merge = json.loads((full / "model" / "merge.json").read_text())
    trained_as = json.loads((full / "train.json").read_text())
    assert merge["prediction_type"] == trained_as["prediction_type"] == "flow" and "CPU" in trained_as["attention"]

    adapted = FluxPipeline.from_pretrained(flux_built["model"])
    before = dict(adapted.transformer.named_parameters())
    before = {n: p.detach().clone() for n, p in before.items()}
    adapted.load_lora_weights(lora / "model", weight_name="pytorch_lora_weights.safetensors")
    adapted.fuse_lora()
    adapted.unload_lora_weights()  # the fused weights stay, under the base names
    changed = [n for n, p in adapted.transformer.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all(any(m in n for m in ("to_q", "to_k", "to_v", "to_out")) for n in changed)
    for run in (full, lora):
        metrics = json.loads((run / "samples" / "metrics.json").read_text())
        assert metrics["images"] == 2 * len(metrics["prompt_list"]) and metrics["scheduler"] == "FlowMatchEulerDiscreteScheduler"
        assert metrics["val_loss"] is not None or metrics.get("val_loss_skipped")


@pytest.mark.flux
def test_killed_flux_run_resumes_bitwise(flux_built, tmp_path):
    """A 2-rank ZeRO-3 FLUX run killed after a checkpoint resumes to the very weights (and EMA) an
    uninterrupted run ends with
    (bug caught: randomness of the flow objective, the logit-normal draw, not derived from the data
    position, so a resumed run trains on other sigmas)."""
    overrides = [*FLUX, "train.zero_stage=3", "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    straight = tmp_path / "straight"
    run_stage("train", tiny_config(*overrides), "--latents", str(flux_built["latents"]), "--model",
              str(flux_built["model"]), "--data", str(flux_built["data"]), "--run-dir", str(straight))
    assert final_weights(straight)
    check_killed_run_resumes_bitwise(flux_built, straight, tmp_path / "killed", overrides, 3, flux_built["latents"])


@pytest.fixture(scope="module")
def flux_width(tmp_path_factory) -> Path:
    """A transformer of FLUX.1's real width (24 heads x 128) with one double- and one single-stream
    block, bf16, random weights: diffusers' BFL readers hard-code that width, so the tiny builtin
    cannot stand in for FLUX.1 here."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flux-width")
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32,
                                   guidance_embeds=True).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)  # every tensor distinct: a swapped pair of keys would show
    model.save_pretrained(folder / "transformer")
    return folder


def test_bfl_export_loads_back_with_from_single_file(flux_width, tmp_path):
    """The transformer written in BFL's layout (the export's checkpoint) is what diffusers'
    FluxTransformer2DModel.from_single_file reads back, tensor for tensor (bugs caught: q/k/v fused in
    another order, the final norm's shift/scale halves not swapped back, a key left out)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from workflow.flux import to_bfl

    model = FluxTransformer2DModel.from_pretrained(flux_width, subfolder="transformer")
    bfl = to_bfl(model.state_dict(), dict(model.config))
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    assert "guidance_in.in_layer.weight" in bfl and "final_layer.adaLN_modulation.1.weight" in bfl
    save_file({k: v.contiguous() for k, v in bfl.items()}, tmp_path / "flux.safetensors")
    back = FluxTransformer2DModel.from_single_file(str(tmp_path / "flux.safetensors"), config=str(flux_width),
                                                   subfolder="transformer", torch_dtype=torch.bfloat16)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_kohya_lora_export_is_the_same_adapter_to_diffusers_loader(flux_width):
    """The LoRA written in kohya's layout (fused qkv, single blocks' linear1) is, after diffusers'
    own kohya-FLUX conversion, the adapter that was trained: every module's delta B A x alpha/r
    equal (bugs caught: q/k/v downs fused without the block-diagonal up, so every part gets every
    part's update; alpha not scaled with the fused rank, loading at a third of its strength)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from workflow.flux import kohya_lora

    model = FluxTransformer2DModel.from_pretrained(flux_width, subfolder="transformer", torch_dtype=torch.float32)
    rank, alpha = 4, 8.0
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    trained = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()}  # lora_A/B, as merged
    kohya = kohya_lora(trained, dict(model.config), alpha)
    legacy = {f"transformer.{k}": v for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(model)).items()}
    assert all(torch.equal(v, kohya[k]) for k, v in kohya_lora(legacy, dict(model.config), alpha).items())  # lora.down/up
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_single_blocks_0_linear1.lora_up.weight",
            "lora_unet_double_blocks_0_img_attn_proj.alpha"} <= set(kohya)
    loaded = FluxPipeline.lora_state_dict(dict(kohya))
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded

    def delta(weights: dict, module: str, scale: float) -> torch.Tensor:
        return weights[f"{module}.lora_B.weight"].float() @ weights[f"{module}.lora_A.weight"].float() * scale

    modules = {k.rsplit(".lora_", 1)[0] for k in trained}
    for module in modules:
        torch.testing.assert_close(delta(loaded, module, 1.0), delta(trained, module, alpha / rank), atol=1e-5, rtol=1e-4)
    extra = {k.rsplit(".lora_", 1)[0] for k in loaded} - modules
    assert all(delta(loaded, m, 1.0).abs().max() == 0 for m in extra)  # linear1's MLP part: no adapter, zeros


def test_block_compile_gives_one_graph_per_block_class_and_eager_results(monkeypatch):
    """train.compile_scope: blocks on a FLUX transformer of 3 double- and 4 single-stream blocks: every
    block compiled, siblings sharing their class's graph (bugs caught: a graph per block, compiling
    57 times on FLUX.1; blocks left out), in training and at a second shape, with the eager model's
    output and gradients. Dynamo's graph count is what is tested: its eager backend stands in for
    Inductor (bench/compile_grads.py is why not Inductor on the CPU)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    from workflow.engine import compile_forward, compiled_blocks
    from workflow.flux import image_ids, pack

    torch.manual_seed(0)
    kwargs = dict(num_layers=3, num_single_layers=4, attention_head_dim=8, num_attention_heads=2, in_channels=16,
                  joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    eager, compiled = FluxTransformer2DModel(**kwargs), FluxTransformer2DModel(**kwargs)
    compiled.load_state_dict(eager.state_dict())
    blocks = compiled_blocks(compiled, "blocks")
    assert blocks == [f"transformer_blocks.{i}" for i in range(3)] + [f"single_transformer_blocks.{i}" for i in range(4)]
    assert compiled_blocks(compiled, "model") is None
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    with dynamo.patch(recompile_limit=8, accumulated_recompile_limit=256):
        sizes = [(4, 2 * n) for n in range(1, 6)]  # 5 bucket shapes (token counts), each trained and validated
        compile_forward(compiled, "per_bucket", shapes=len(sizes), blocks=blocks)
        for h, w in sizes:
            latents, text = torch.randn(2, 4, h, w), torch.randn(2, 5, 16)
            inputs = dict(hidden_states=pack(latents), encoder_hidden_states=text, pooled_projections=torch.randn(2, 8),
                          timestep=torch.tensor([0.3, 0.7]), img_ids=image_ids(h, w, "cpu", torch.float32),
                          txt_ids=torch.zeros(5, 3), return_dict=False)
            outs = [model(**inputs)[0] for model in (eager, compiled)]
            for out in outs:
                out.square().mean().backward()
            assert torch.allclose(outs[0], outs[1], atol=1e-6)
            with torch.no_grad():
                assert torch.allclose(compiled(**inputs)[0], outs[0], atol=1e-6)
        # per shape and grad mode: the double-stream blocks' graph, the single-stream blocks' two (the
        # first one's input is a view of the double-stream output: other strides, another graph); below
        # the count, Dynamo's recompile limit ran the later shapes eagerly (bug caught: limit left at
        # 2 graphs a shape, as for the whole model's forward)
        assert counters["stats"]["unique_graphs"] == len(sizes) * 2 * 3
    torch._dynamo.reset()
    grads = [[p.grad for p in model.parameters()] for model in (eager, compiled)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.flux
@pytest.mark.long(12)
@runs(TINY_FLUX, TINY_FLUX_BUCKETS)
@pytest.mark.parametrize("command, run_name, steps, sizes", [
    (TINY_FLUX, "digits-flux", 300, None), (TINY_FLUX_BUCKETS, "digits-flux-buckets", 450, ("48x32", "32x48"))],
    ids=["square", "buckets"])
def test_tiny_flux_learns_the_digits_as_the_docs_show(tmp_path, command, run_name, steps, sizes):
    """docs/models.md's two FLUX lines as written: every stage runs, the samples draw the digits asked
    for (digit_accuracy >= 0.90, square and in wide and tall buckets), the run is a flow-matching one,
    and the export is the transformer in BFL's layout."""
    from safetensors import safe_open

    repo = copy_repo(tmp_path / "repo")
    proc = run_documented(command, repo, timeout=2400)  # a hang guard: 12 minutes beside the other lanes
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = repo / "results" / "runs" / run_name
    result = json.loads((run / "train.json").read_text())
    assert (result["prediction_type"], result["final_step"]) == ("flow", steps)
    metrics = json.loads((run / "samples" / "metrics.json").read_text())
    assert metrics["digit_accuracy"] >= 0.90 and metrics["scheduler"] == "FlowMatchEulerDiscreteScheduler", metrics
    if sizes:
        assert all(metrics["digit_accuracy_per_size"][s] >= 0.90 for s in sizes), metrics["digit_accuracy_per_size"]
    with safe_open(str(run / "export" / f"{run_name}.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and not any(k.startswith("transformer_blocks") for k in keys)
