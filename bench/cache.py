"""Benchmark the cache stage against the VAE encoder alone, in the same run. Prints JSON.

    python bench/cache.py                       # GPU: SD 1.5 architecture, 512 px JPEGs
    python bench/cache.py --images 16 --resolution 64 --batch 4   # CPU smoke run

Steps: build `builtin:sd15-arch` (random weights: real shapes, real cost), write synthetic JPEGs
(larger than the target, so they are decoded, resized and cropped like real photos), run
`prepare`, then time
  encoder_alone: vae.encode on one resident batch (no decode, no text, no I/O)
  cache_stage:   the stage's own per-shard code (decode + resize in threads, VAE, text encoder,
                 npy + tar writing), models already loaded, all shards
and report images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_common import write_jpegs  # noqa: E402
from workflow.cache import DECODE_THREADS, LatentEncoder, cache_shard, decoded_batches  # noqa: E402
from workflow.config import load_config  # noqa: E402
from workflow.fetch_model import fetch_model  # noqa: E402
from workflow.prepare import prepare  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def encoder_alone(enc: LatentEncoder, batch: int, resolution: int, iters: int) -> float:
    x = torch.randn(batch, 3, resolution, resolution, device=enc.device, dtype=enc.dtype)
    with torch.no_grad():
        for _ in range(3):
            enc.vae.encode(x)
        sync(enc.device)
        t = time.perf_counter()
        for _ in range(iters):
            enc.vae.encode(x).latent_dist.mean.half().cpu()
        sync(enc.device)
    return batch * iters / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--source-size", default="768x640", help="synthetic JPEG size WxH")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cache-"))
    cfg = load_config(None, ["model.pretrained=builtin:sd15-arch", f"data.source=imagefolder:{root / 'jpegs'}",
                             f"data.shard_size={args.shard_size}", f"cache.resolution={args.resolution}",
                             f"cache.batch_size={args.batch}"])
    w, h = (int(v) for v in args.source_size.split("x"))
    write_jpegs(root / "jpegs", args.images, (w, h))
    data = prepare(cfg, root / "data")
    fetch_model(cfg, root / "model", None)

    enc = LatentEncoder(root / "model", device)
    alone = encoder_alone(enc, args.batch, args.resolution, args.iters)

    # Warm the stage path once (cudnn autotuning for this batch shape), then time every shard.
    warm = root / "warm.tar"
    cache_shard(enc, cfg, root / "data" / data["shards"][0]["name"], warm)
    sync(device)
    t = time.perf_counter()
    for shard in data["shards"]:
        cache_shard(enc, cfg, root / "data" / shard["name"], root / f"out-{shard['name']}")
    sync(device)
    stage = data["count"] / (time.perf_counter() - t)

    # Where the time goes: each part of the stage alone, on the same data.
    t = time.perf_counter()
    for shard in data["shards"]:
        for _ in decoded_batches(cfg, root / "data" / shard["name"], DECODE_THREADS):
            pass
    decode_only = data["count"] / (time.perf_counter() - t)
    pixels = next(decoded_batches(cfg, root / "data" / data["shards"][0]["name"], DECODE_THREADS))[1]
    sync(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        enc.submit(pixels, False, ["a synthetic photo"] * len(pixels)).result()
    sync(device)
    images_only = len(pixels) * args.iters / (time.perf_counter() - t)

    result = {
        "bench": "cache", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": "builtin:sd15-arch", "resolution": args.resolution, "source_size": args.source_size,
        "batch": args.batch, "images": data["count"], "dtype": str(enc.dtype).replace("torch.", ""),
        "encoder_alone_img_s": round(alone, 1), "cache_stage_img_s": round(stage, 1),
        "ratio": round(stage / alone, 3), "torch": torch.__version__,
        "breakdown_img_s": {"decode_resize_only": round(decode_only, 1), "vae_and_text_with_uint8_upload": round(images_only, 1)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
