"""Time the compiled plain-PyTorch SD 1.5 UNet train step under one variant. Prints one JSON line.

    CUDA_VISIBLE_DEVICES=0 python3 bench/unet_variants.py base                    # micro-batch 64
    CUDA_VISIBLE_DEVICES=1 python3 bench/unet_variants.py base --micro-batch 128
    CUDA_VISIBLE_DEVICES=2 python3 bench/unet_variants.py sdpa_flash
    python3 bench/unet_variants.py base --micro-batch 32 --shapes 640x384,512x512,384x640 --compile-shapes dynamic

For choosing settings before wiring them into the train stage (bench/train.py then holds the stage to
the plain loop). The step is bench/train.py's plain loop without the data: random-weight SD 1.5 UNet
(fp32 weights, bf16 autocast, torch.compile of forward), fused AdamW, clipping at 1.0, and random
latents and text states of SD 1.5's shapes resident on the GPU. Each variant runs in its own process
(compile settings are process-wide). GPU only.

--shapes: image sizes in turn (aspect-ratio buckets), each its latent shape; with several,
--compile-shapes is train.compile_shapes (workflow.engine.compile_forward), and the JSON gives each
shape's first-step (compile) seconds, its steady img/s and the graphs Dynamo compiled.

--take-turns DIR:K:N: N of these processes share one GPU; they compile side by side (compilation is
mostly host work), then time one at a time in the order of K (0 first), meeting through files in DIR:
N variants in about the time of the slowest compile, each timed alone.

Variants:
  base              torch defaults (SDPA picks its backend: cuDNN attention on Hopper)
  cudnn_benchmark   torch.backends.cudnn.benchmark = True
  sdpa_flash        SDPA restricted to flash attention (cuDNN and memory-efficient off)
  sdpa_efficient    SDPA restricted to memory-efficient attention (cuDNN and flash off)
  inductor_flags    Inductor conv_1x1_as_mm, coordinate_descent_tuning, epilogue_fusion=False
  coord_desc        Inductor coordinate_descent_tuning only
  fuse_qkv          diffusers' fuse_qkv_projections (one q/k/v GEMM for self-attention)
  max_autotune      torch.compile(mode="max-autotune-no-cudagraphs")
  reduce_overhead   torch.compile(mode="reduce-overhead") (CUDA graphs)
  fp16              fp16 autocast with a dynamic loss scaler (torch.amp.GradScaler) instead of bf16
  whole_graph       the compiled step (noise, forward, backward, clipping, capturable fused AdamW) captured
                    whole in one CUDA graph over static input buffers, the data copied in outside the
                    graph; what NVIDIA's MLPerf entry does. Clipping stays unconditional (no host sync)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflow.buckets import parse_size, size_name  # noqa: E402
from workflow.engine import compile_forward  # noqa: E402

VARIANTS = ("base", "cudnn_benchmark", "sdpa_flash", "sdpa_efficient", "inductor_flags", "coord_desc", "fuse_qkv",
            "max_autotune", "reduce_overhead", "fp16", "whole_graph")


def apply_process_settings(variant: str) -> None:
    if variant == "cudnn_benchmark":
        torch.backends.cudnn.benchmark = True
    if variant == "sdpa_flash":
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    if variant == "sdpa_efficient":
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)
    if variant in ("inductor_flags", "coord_desc"):
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True
        if variant == "inductor_flags":
            inductor.conv_1x1_as_mm = True
            inductor.epilogue_fusion = False


def wait_for(check, what: str, deadline_s: float = 1200) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"unet_variants: gave up waiting for {what} after {deadline_s:.0f} s")
        time.sleep(0.5)


class Turns:
    """Processes sharing a GPU: all compile at once, then each times alone, in turn."""

    def __init__(self, spec: str | None):
        self.dir, self.k, self.n = None, 0, 1
        if spec:
            folder, k, n = spec.rsplit(":", 2)
            self.dir, self.k, self.n = Path(folder), int(k), int(n)
            self.dir.mkdir(parents=True, exist_ok=True)

    def mine(self) -> None:
        """Return when every process has compiled and the previous one has finished timing."""
        if self.dir is None:
            return
        (self.dir / f"ready-{self.k}").touch()
        wait_for(lambda: len(list(self.dir.glob("ready-*"))) >= self.n, "every process to compile")
        if self.k:
            wait_for((self.dir / f"done-{self.k - 1}").exists, f"turn {self.k - 1} to finish timing")

    def done(self) -> None:
        if self.dir is not None:
            (self.dir / f"done-{self.k}").touch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8, help="steps before the timing (compilation)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps (per shape)")
    ap.add_argument("--shapes", default="512x512", help="comma-separated WxH image sizes, in turn")
    ap.add_argument("--compile-shapes", default="auto", choices=("auto", "dynamic", "per_bucket"))
    ap.add_argument("--take-turns", metavar="DIR:K:N", help="share the GPU with N-1 other runs (see above)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/unet_variants.py needs a CUDA GPU")
    from diffusers import UNet2DConditionModel

    variant, mb, dev = args.variant, args.micro_batch, torch.device("cuda")
    apply_process_settings(variant)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(dev)  # SD 1.x's UNet
    if variant == "fuse_qkv":
        unet.fuse_qkv_projections()
    unet.train()
    mode = {"max_autotune": "max-autotune-no-cudagraphs", "reduce_overhead": "reduce-overhead"}.get(variant)
    sizes = [parse_size(x) for x in args.shapes.split(",")]
    if mode is None:
        compile_forward(unet, args.compile_shapes, len(sizes))
    else:
        unet.forward = torch.compile(unet.forward, mode=mode)
    # capturable: the step count and bias corrections stay on the GPU, so the graph holds the update
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5, fused=True,
                            capturable=variant == "whole_graph")
    amp = torch.float16 if variant == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=variant == "fp16")
    alphas = torch.linspace(0.999, 0.01, 1000, device=dev)
    batches = {size: [(torch.randn(mb, 4, size[1] // 8, size[0] // 8, device=dev), torch.randn(mb, 77, 768, device=dev))
                      for _ in range(2)] for size in sizes}

    def step(latents: torch.Tensor, text: torch.Tensor) -> None:
        noise = torch.randn_like(latents)
        ts = torch.randint(0, 1000, (mb,), device=dev)
        a = alphas[ts].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast("cuda", dtype=amp):
            pred = unet(noisy, ts, encoder_hidden_states=text).sample
        scaler.scale(F.mse_loss(pred.float(), noise)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=variant != "whole_graph")  # a graph's gradients keep their addresses

    graphs = {}

    def graphed_step(latents: torch.Tensor, text: torch.Tensor) -> None:
        """Replay the captured step of this shape on a copy of the batch (captured at first use, after
        warm-up steps on a side stream, which also compile)."""
        key = tuple(latents.shape)
        if key not in graphs:
            static = (latents.clone(), text.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(*static)
            graphs[key] = (graph, static)
        graph, static = graphs[key]
        static[0].copy_(latents, non_blocking=True)
        static[1].copy_(text, non_blocking=True)
        graph.replay()

    run_step = graphed_step if variant == "whole_graph" else step

    def timed(size: tuple[int, int], steps: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(steps):
            run_step(*batches[size][i % 2])
        torch.cuda.synchronize()
        return time.perf_counter() - started

    first_s = {}
    for size in sizes:  # each shape's first step compiles; said as it ends, so a run stopped later still tells
        name = size_name(size)
        first_s[name] = round(timed(size, 1), 1)
        print(f"first step at {name}: {first_s[name]} s", file=sys.stderr, flush=True)
    warm_s = sum(timed(sizes[i % len(sizes)], 1) for i in range(args.warmup))
    turns = Turns(args.take_turns)
    turns.mine()
    torch.cuda.reset_peak_memory_stats()
    # the shapes interleaved, as buckets come in training
    per_size = {size: 0.0 for size in sizes}
    for i in range(args.steps * len(sizes)):
        size = sizes[i % len(sizes)]
        per_size[size] += timed(size, 1)
    seconds = sum(per_size.values())
    turns.done()
    from torch._dynamo.utils import counters

    print(json.dumps({"variant": variant, "mb": mb, "compile_shapes": args.compile_shapes,
                      "img_s": round(mb * args.steps * len(sizes) / seconds, 1),
                      "img_s_per_shape": {size_name(k): round(mb * args.steps / v, 1) for k, v in per_size.items()},
                      "step_ms": round(1000 * seconds / (args.steps * len(sizes)), 1), "first_step_s": first_s,
                      "warm_s": round(warm_s, 1), "graphs": counters["stats"]["unique_graphs"],
                      "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}), flush=True)


if __name__ == "__main__":
    main()
