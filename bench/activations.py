"""What each UNet block keeps for backward, and what recomputing it costs: the figures that choose
train.gradient_checkpointing's blocks. Prints JSON. Needs no GPU and no compute: the UNet runs on
PyTorch's meta device (shapes and dtypes only), so SDXL at 1024 px takes seconds on any machine.

    python bench/activations.py                                              # builtin:sd15-arch, 512 px
    python bench/activations.py --model builtin:sdxl-arch                    # 1024 px
    python bench/activations.py --sets down_blocks.0,up_blocks.3 up_blocks.2,up_blocks.3
    python bench/activations.py --lora-rank 32                               # LoRA: the frozen UNet keeps less
    python bench/activations.py --budgets 1 0.6 0.5 0.4                      # train.activation_memory_budget

One forward of the UNet (bf16 weights as config/gpu.yaml trains; micro-batch 1) per checkpointing
setting: none, all, each block alone, and each of --sets. `saved_mib` is what autograd keeps for
backward after the forward: the tensors saved by the ops outside checkpointed blocks plus the inputs
each checkpointed block keeps, counted once per storage, the weights left out (they stay in memory
whatever is checkpointed). `freed_mib` is a setting's saving against none, `forward_gflops` what
recomputing a block costs once per micro-batch (torch's FLOP counter: matmuls, convolutions,
attention). For a micro-batch of N, multiply both by N.

--budgets: what the compiled UNet keeps for backward under each train.activation_memory_budget, and
the forward FLOPs its backward recomputes for it (the backward's FLOPs above budget 1's, which is
always measured), the forward compiled as the train stage compiles it but through AOTAutograd's own
backend with Inductor's partitioner (`aot_eager_decomp_partition`: the same split into forward and
backward, no kernels generated, so it runs on the meta device). Budget 1 is what a compiled run
keeps without a budget (less than eager: the partitioner recomputes some pointwise ops already).
Pointwise recompute costs memory traffic, not FLOPs, so the time is a GPU's to measure
(bench/train.py). About 30 s a budget (SD 1.5).

Attention is counted as a flash kernel keeps it (queries, keys, values, output and the softmax's
log-sum-exp; no attention matrix): what SDPA's flash, memory-efficient and cuDNN backends keep on a
GPU. On the meta device SDPA would take its math fallback, which keeps the matrix, so the flash
kernel is called instead (the FLOPs are the same either way).

What this is not: the GPU's peak. The peak adds the weights, gradients and optimizer state, the
temporaries of backward and the caching allocator's slack; bench/train.py --memory-cap-gb measures a
recipe under a card's cap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflow.config import LoraConfig  # noqa: E402
from workflow.families import down_sampling  # noqa: E402
from workflow.families import FAMILIES  # noqa: E402
from workflow.models import ARCH_UNETS, add_lora  # noqa: E402

MIB = 2**20


def random_unet(model: str, dtype: torch.dtype, device: str = "meta", lora_rank: int | None = None):
    """The UNet of a builtin architecture or of a local diffusers folder, random weights on `device`;
    with `lora_rank`, frozen, with the train stage's LoRA adapters (in `dtype`, as DeepSpeed casts them)."""
    from diffusers import UNet2DConditionModel

    config = ARCH_UNETS.get(model) or UNet2DConditionModel.load_config(model, subfolder="unet")
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
        if lora_rank:
            add_lora(unet, LoraConfig(rank=lora_rank))
    return unet.to(dtype).train()


def vae_factor(model: str) -> int:
    """How much the model's VAE shrinks an image: a folder's own VAE says; the SD architectures' 8."""
    return down_sampling(model, "vae") if Path(model).is_dir() else 8


def unet_inputs(config, micro_batch: int, resolution: int, vae: int, dtype: torch.dtype, device="meta") -> dict:
    """Latents, timesteps and text states of a training micro-batch; SDXL's added conditions too."""
    side = resolution // vae
    inputs = {"sample": torch.randn(micro_batch, config.in_channels, side, side, device=device, dtype=dtype),
              "timestep": torch.randint(0, 1000, (micro_batch,), device=device),
              "encoder_hidden_states": torch.randn(micro_batch, 77, config.cross_attention_dim, device=device,
                                                   dtype=dtype)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(micro_batch, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.full((micro_batch, 6), float(resolution), device=device)}
    return inputs


@contextmanager
def kept_for_backward(unet):
    """{storage: bytes} that autograd saves for backward inside the block, the weights left out."""
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # views of one tensor share it; kept alive, so its id stays unique
        if storage._cdata not in weights:
            kept[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


def saved_bytes(unet, inputs: dict, blocks: list[str]) -> int:
    """Bytes autograd keeps for backward after one forward that checkpoints `blocks`."""
    FAMILIES["sd1"].set_checkpointing(unet, blocks)
    # Inside a checkpointed block, checkpoint's own hooks take the saved tensors (and drop them);
    # what it keeps, the block's inputs, is saved outside them and counted here.
    with flash_attention(next(unet.parameters()).is_meta), kept_for_backward(unet) as kept:
        out = unet(**inputs).sample
    del out
    return sum(kept.values())


@contextmanager
def flash_attention(active: bool = True):
    """SDPA as a flash kernel computes it (see the module's docstring); on a real device, SDPA's own choice."""
    if not active:
        yield
        return
    sdpa = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        assert attn_mask is None and dropout_p == 0.0, "the UNet's attention takes no mask or dropout"
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def compiled_budget(unet, inputs: dict, budget: float) -> tuple[int, float]:
    """(bytes the compiled forward keeps for backward, FLOPs of its backward) under activation memory
    `budget`: the backward's FLOPs above budget 1's are the forward work it recomputes."""
    import torch._functorch.config as functorch
    import torch.utils.flop_counter as flop_counter

    FAMILIES["sd1"].set_checkpointing(unet, [])
    torch._dynamo.reset()  # a new partition for each budget, not the graph compiled for the last one

    # the counter knows the GPU's flash kernels, not the CPU one flash_attention() calls: the same FLOPs
    def cpu_flash(q, k, v, *_, out_shape=None, **__):
        return flop_counter.sdpa_flop_count(q, k, v)

    def cpu_flash_backward(grad, q, k, v, *_, out_shape=None, **__):
        return flop_counter.sdpa_backward_flop_count(grad, q, k, v)

    aten = torch.ops.aten
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward})
    forward = torch.compile(unet.forward, backend="aot_eager_decomp_partition")
    with functorch.patch(activation_memory_budget=budget), flash_attention(next(unet.parameters()).is_meta):
        with kept_for_backward(unet) as kept:
            loss = forward(**inputs).sample.float().square().mean()
        with counter:
            loss.backward()
    unet.zero_grad(set_to_none=True)
    return sum(kept.values()), counter.get_total_flops()


def forward_flops(unet, inputs: dict, blocks: list[str]) -> dict[str, float]:
    """Forward FLOPs of each top-level block (and of the whole UNet, under "all")."""
    from torch.utils.flop_counter import FlopCounterMode

    FAMILIES["sd1"].set_checkpointing(unet, [])
    # SDPA's math fallback here (the counter knows no CPU flash kernel): its two matrix products are
    # the attention FLOPs any backend does
    counter = FlopCounterMode(display=False, depth=3)
    with counter, torch.no_grad():
        unet(**inputs)
    counts = counter.get_flop_counts()
    per_module = {name.split(".", 1)[1] if "." in name else name: sum(ops.values()) for name, ops in counts.items()}
    return {block: per_module.get(block, 0) for block in blocks} | {"all": counter.get_total_flops()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:sd15-arch", help="builtin:sd15-arch | builtin:sdxl-arch | a "
                    "diffusers folder (its unet/config.json)")
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA: the UNet frozen, adapters of this rank on "
                    "train.lora's default modules (frozen layers keep less for backward)")
    ap.add_argument("--sets", nargs="*", default=[], help="block sets to measure together, comma-separated each")
    ap.add_argument("--budgets", nargs="*", type=float, default=[], help="train.activation_memory_budget values: "
                    "what the compiled UNet keeps under each and the forward GFLOPs its backward recomputes "
                    "(0 < budget <= 1; budget 1 is always measured, the baseline of the recompute)")
    args = ap.parse_args()

    bad = [b for b in args.budgets if not 0 < b <= 1]
    if bad:
        ap.error(f"--budgets {bad}: a budget lies in (0, 1], as train.activation_memory_budget")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    started = time.time()
    unet = random_unet(args.model, dtype, lora_rank=args.lora_rank)
    resolution = args.resolution or unet.config.sample_size * vae_factor(args.model)
    inputs = unet_inputs(unet.config, args.micro_batch, resolution, vae_factor(args.model), dtype)
    blocks = FAMILIES["sd1"].blocks(unet.config)
    none = saved_bytes(unet, inputs, [])
    flops = forward_flops(unet, inputs, blocks)
    rows = []
    for block in blocks:
        freed = none - saved_bytes(unet, inputs, [block])
        rows.append({"block": block, "freed_mib": round(freed / MIB, 1), "forward_gflops": round(flops[block] / 1e9, 1),
                     "mib_per_gflop": round(freed / MIB / max(flops[block] / 1e9, 1e-9), 2)})
    sets = {}
    for spec in ["all"] + args.sets:
        chosen = blocks if spec == "all" else spec.split(",")
        unknown = [b for b in chosen if b not in blocks]
        if unknown:
            raise SystemExit(f"--sets {spec}: {unknown} not among this UNet's blocks: {', '.join(blocks)}")
        saved = saved_bytes(unet, inputs, chosen)
        sets[spec] = {"saved_mib": round(saved / MIB, 1), "freed_mib": round((none - saved) / MIB, 1),
                      "recompute_gflops": round(sum(flops[b] for b in chosen) / 1e9, 1)}
    compiled = {}
    if args.budgets:
        budgets = sorted(set(args.budgets) | {1.0}, reverse=True)  # budget 1: the backward without recompute
        measured = {b: compiled_budget(unet, inputs, b) for b in budgets}
        compiled = {str(b): {"saved_mib": round(kept / MIB, 1),
                             "recompute_gflops": round((backward - measured[1.0][1]) / 1e9, 1)}
                    for b, (kept, backward) in measured.items()}
    print(json.dumps({"model": args.model, "mode": f"lora rank {args.lora_rank}" if args.lora_rank else "full",
                      "resolution": resolution, "micro_batch": args.micro_batch,
                      "dtype": args.dtype, "torch": torch.__version__, "saved_mib_without_checkpointing": round(none / MIB, 1),
                      "forward_gflops": round(flops["all"] / 1e9, 1), "blocks": rows, "sets": sets, "compiled_budgets": compiled,
                      "seconds": round(time.time() - started, 1)}, indent=1))


if __name__ == "__main__":
    main()
