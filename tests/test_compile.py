"""What torch.compile does in training, on the CPU: which regions `train.compile_scope: blocks`
compiles in an SDXL-shaped UNet and how many graphs they cost, that a step repeated compiles nothing
more, and that a second process (a resumed or requeued job) reuses what the first compiled into
`train.compile_cache`. Speeds are GPU figures (BENCHMARKS.md); these are the counts behind them.
Dynamo's graph counts use its eager backend (Inductor's CPU gradients: bench/compile_grads.py); the
cache test compiles with Inductor a graph of matrix products only (its extern kernels: no C++ build)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO


def sdxl_shaped_unet():
    """SDXL's UNet layout at toy widths: a plain first level, transformer depths 1 / 2 / 4 (SDXL: 1, 2,
    10; the 4 stand for the deep level), two resnets a down level, linear projections, text_time
    conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4), attention_head_dim=(2, 4, 4), cross_attention_dim=16,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4, norm_num_groups=8)


def test_sdxl_block_compile_shares_graphs_and_a_second_step_compiles_nothing(monkeypatch):
    """train.compile_scope: blocks on an SDXL-shaped UNet: every transformer block and resnet compiled
    (diffusers' _repeated_blocks and our resnets), the siblings of a class and shape sharing one
    graph, the results the eager model's, and the second step and a second bucket's second step
    compiling nothing (bugs caught: a graph per block, so SDXL's 70 transformer blocks compile 70
    times at every start; regions left eager; a guard that fails every step, recompiling forever)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo
    from torch._dynamo.utils import counters

    from workflow.engine import compile_forward, compiled_blocks

    eager, compiled = sdxl_shaped_unet(), sdxl_shaped_unet()
    blocks = compiled_blocks(compiled, "blocks")
    classes = {name: type(compiled.get_submodule(name)).__name__ for name in blocks}
    transformers = [n for n, c in classes.items() if c == "BasicTransformerBlock"]
    resnets = [n for n, c in classes.items() if c == "ResnetBlock2D"]
    # transformer blocks: down levels 1-2 two attentions of depth 2 and 4, the mid one of 4, up levels 0-1
    # three of 4 and 2; resnets: two a down level and the mid block, three an up level
    assert (len(transformers), len(resnets), len(blocks)) == (2 * 2 + 2 * 4 + 4 + 3 * 4 + 3 * 2, 6 + 2 + 9, 51)
    assert "down_blocks.2.attentions.1.transformer_blocks.3" in transformers and "mid_block.resnets.1" in resnets

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()

    def step(model, h: int, w: int):
        g = torch.Generator().manual_seed(h * 100 + w)
        out = model(torch.randn(2, 4, h, w, generator=g), torch.tensor([10, 500]),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(2, 8, generator=g),
                                       "time_ids": torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * 2).float()}).sample
        out.square().mean().backward()
        return out.detach()

    with dynamo.patch(recompile_limit=8, accumulated_recompile_limit=256):
        compile_forward(compiled, "per_bucket", shapes=2, blocks=blocks)
        assert torch.allclose(step(compiled, 8, 8), step(eager, 8, 8), atol=1e-5)
        first = counters["stats"]["unique_graphs"]
        # SDXL's blocks of one class meet few distinct shapes: the graphs are far fewer than the blocks
        assert 0 < first <= len(blocks) // 3, (first, len(blocks))
        step(compiled, 8, 8)
        assert counters["stats"]["unique_graphs"] == first  # guards hold: nothing recompiled
        step(compiled, 8, 16)  # a second bucket shape: its own graphs once, then none
        second = counters["stats"]["unique_graphs"]
        step(compiled, 8, 16)
        assert counters["stats"]["unique_graphs"] == second > first
        for name, param in compiled.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    torch._dynamo.reset()


CACHE_PROBE = """
import json, sys, time
import torch
from torch._dynamo.utils import counters
from workflow.engine import use_compile_cache

use_compile_cache(sys.argv[1])
a = torch.randn(64, 32, requires_grad=True)
b = torch.randn(32, 16, requires_grad=True)
started = time.time()
out = torch.compile(lambda a, b: a @ b)(a, b)
out.backward(torch.ones_like(out))
print(json.dumps({"fx": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]),
                  "seconds": time.time() - started}))
"""


def test_a_second_process_reuses_the_compiled_graphs(tmp_path):
    """train.compile_cache across processes, as a resumed or requeued job on the same filesystem meets
    it: the first process compiles forward and backward and writes them there, the second loads them
    (Inductor's FX-graph cache and AOTAutograd's cache hit, nothing compiled anew). Bug caught: a cache
    folder set too late or keyed on something that changes per process (every start compiles again:
    minutes per requeue on a cluster)."""
    cache = tmp_path / "cache"

    def probe() -> dict:
        proc = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(cache)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold, warm = probe(), probe()
    assert cold["fx"].get("fxgraph_cache_miss", 0) >= 2 and not cold["fx"].get("fxgraph_cache_hit"), cold
    assert warm["fx"].get("fxgraph_cache_hit", 0) >= 2 and not warm["fx"].get("fxgraph_cache_miss"), warm
    assert warm["aot"].get("autograd_cache_hit", 0) >= 1, warm
