"""bench/compile_grads.py on the CPU, where torch's Inductor is known to get a UNet's gradients wrong:
the bench must say so (exit 1, the weights named), and pass a backend that gets them right."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

# A two-level UNet (one cross-attention level) whose upsampler Inductor 2.13 mis-differentiates on
# the CPU; 8x8 latents keep the compile short.
SMALL_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)


@pytest.fixture(scope="module")
def small_unet_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("small-unet")
    UNet2DConditionModel(**SMALL_UNET).save_config(folder / "unet")
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8).save_config(folder / "vae")
    return folder


def compile_grads(folder, backend: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "bench/compile_grads.py", "--model", str(folder), "--device", "cpu",
                           "--dtype", "fp32", "--resolution", "64", "--micro-batch", "1", "--backend", backend],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.e2e  # Inductor's C++ compile of the UNet: about a minute and a half on 2 cores
def test_compile_grads_catches_cpu_inductor_zero_gradients(small_unet_folder):
    """Bug caught: a comparison that cannot fail (the compiled copy's gradients compared with
    themselves, a zero gradient counted as agreeing, a LoRA with lora_B at zero where every lora_A
    gradient is zero both ways). When this fails because torch fixed Inductor, lift the train
    stage's refusal of train.compile on a CPU (workflow/train.py preflight)."""
    rc, inductor = compile_grads(small_unet_folder, "inductor")
    assert rc == 1 and not inductor["ok"], inductor
    assert inductor["zero_only_compiled"] > 0 and "mid_block" in inductor["zero_only_compiled_blocks"], inductor
    assert inductor["max_rel_diff"] == 1.0  # a zeroed gradient is 100 % off
    rc, aot = compile_grads(small_unet_folder, "aot_eager")  # the same graphs without Inductor's code
    assert rc == 0 and aot["ok"] and aot["zero_only_compiled"] == 0 and aot["max_rel_diff"] < 1e-4, aot
    assert aot["weights"] == inductor["weights"] > 100


def test_fp32_reference_tells_bf16_rounding_from_a_wrong_gradient(small_unet_folder):
    """--reference fp32: a weight whose compiled and eager bf16 gradients differ only as much as each
    differs from fp32 passes, a compiled gradient off where eager is not fails. Bug caught: the check
    that flagged SDXL LoRA's 0.29 compiled-vs-eager difference could not say which run was off (a
    reference that is one of the two runs, or an excess taken the wrong way round, passes both)."""
    sys.path.insert(0, str(REPO / "bench"))
    from compile_grads import compare

    import torch

    fp32 = {"rounded": torch.tensor([1.0, 0.0]), "wrong": torch.tensor([1.0, 0.0])}
    eager = {"rounded": torch.tensor([1.0, 0.3]), "wrong": torch.tensor([1.0, 0.01])}
    compiled = {"rounded": torch.tensor([1.0, -0.3]), "wrong": torch.tensor([0.7, 0.3])}
    result = compare(eager, compiled, fp32)
    assert result["max_rel_diff"] == pytest.approx(0.6 / 1.09 ** 0.5, abs=1e-4) and result["max_rel_diff_weight"] == "rounded"
    assert result["max_excess_weight"] == "wrong" and result["max_excess"] == pytest.approx(0.4143, abs=1e-3)
    assert result["max_rel_diff_weight_vs_fp32"] == {"eager": pytest.approx(0.3, abs=1e-4), "compiled": pytest.approx(0.3, abs=1e-4)}
    without_wrong = compare({"rounded": eager["rounded"]}, {"rounded": compiled["rounded"]}, {"rounded": fp32["rounded"]})
    assert without_wrong["max_excess"] == pytest.approx(0.0, abs=1e-6)

    # The whole command: aot_eager in bf16 against fp32 (no Inductor compile), the result's keys.
    proc = subprocess.run([sys.executable, "bench/compile_grads.py", "--model", str(small_unet_folder), "--device", "cpu",
                           "--resolution", "64", "--micro-batch", "1", "--backend", "aot_eager", "--reference", "fp32"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    run = json.loads(proc.stdout)
    assert proc.returncode == 0 and run["ok"] and run["reference"] == "fp32" and run["dtype"] == "bf16", run
    assert 0 < run["eager_vs_fp32_max"] < 0.1 and abs(run["max_excess"]) < 0.05, run
    refused = subprocess.run([sys.executable, "bench/compile_grads.py", "--dtype", "fp32", "--reference", "fp32"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--reference fp32" in refused.stderr
