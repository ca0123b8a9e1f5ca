"""Stage `cache`: prepared images -> VAE posteriors + text embeddings in webdataset shards.

Per sample: `mean.npy` and `std.npy` (the VAE posterior, fp16, unscaled: training applies the VAE's
scaling), `text.npy` (last hidden state per caption, fp16, shape (captions, tokens, dim)) and
`json` (captions, label). Beside the shards: `null_text.npy` (the empty caption, for caption
dropout) and `manifest.json` with `count`, `shards`, shapes and the `fingerprint` that `train`
checks against its own config.

Each output shard corresponds to one input shard and has a sidecar `<shard>.json` (count, sha256,
fingerprint): a rerun after a crash skips shards already finished with the same fingerprint.

    python -m workflow.cache --config config.yaml --data results/data/digits \
        --model resources/models/tiny-digits --out results/latents/digits/tiny-digits_32px
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import run, stage_main
from .config import Config
from .fsutil import read_json, sha256_file, sha256_json, sha256_tree, write_json
from .imaging import center_crop_resize, decode_image, to_tensor
from .models import check_model_dir, encode_prompts, load_text_encoder, load_tokenizer, load_vae
from .shards import AtomicTar, iter_shard, npy_bytes

CACHE_FORMAT = 1
STORE_DTYPE = "fp16"


def cache_fingerprint(cfg: Config, model_dir: Path, data_dir: Path) -> dict[str, str]:
    """Everything the cached tensors depend on, each part hashed so a mismatch can be named."""
    model_dir = check_model_dir(model_dir)
    parts = {
        "vae": sha256_tree(model_dir / "vae"),
        "text_encoder": sha256_tree(model_dir / "text_encoder"),
        "tokenizer": sha256_tree(model_dir / "tokenizer"),
        "resolution": str(cfg.cache.resolution),
        "center_crop": str(cfg.cache.center_crop),
        "dtype": STORE_DTYPE,
        "data_manifest": sha256_file(data_dir / "manifest.json"),
        "format": str(CACHE_FORMAT),
    }
    parts["all"] = sha256_json(parts)
    return parts


def fingerprint_mismatch(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return [k for k in expected if k != "all" and expected.get(k) != found.get(k)]


def device_for_caching() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class LatentEncoder:
    """Loads the VAE and text encoder once; encodes image batches and caption lists."""

    def __init__(self, model_dir: Path, device: torch.device):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.device, self.dtype = device, dtype
        self.vae = load_vae(model_dir, device, dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.text_encoder = load_text_encoder(model_dir, device, dtype)

    @torch.no_grad()
    def images(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        x = to_tensor(images).to(self.device, self.dtype)
        post = self.vae.encode(x).latent_dist
        return post.mean.half().cpu().numpy(), post.std.half().cpu().numpy()

    def captions(self, captions: list[str]) -> np.ndarray:
        return encode_prompts(self.tokenizer, self.text_encoder, captions, self.device).half().cpu().numpy()


def cache_shard(enc: LatentEncoder, cfg: Config, src: Path, dest: Path) -> dict[str, Any]:
    """Encode one prepared shard into one latent shard (written atomically)."""
    batch: list[dict] = []
    with AtomicTar(dest) as tar:
        def flush():
            images = [center_crop_resize(decode_image(s), cfg.cache.resolution) for s in batch]
            means, stds = enc.images(images)
            metas = [json.loads(s["json"]) for s in batch]
            texts = enc.captions([c for m in metas for c in m["captions"]])
            offsets = np.cumsum([0] + [len(m["captions"]) for m in metas])
            for i, (s, meta) in enumerate(zip(batch, metas)):
                tar.write({"__key__": s["__key__"], "mean.npy": npy_bytes(means[i]), "std.npy": npy_bytes(stds[i]),
                           "text.npy": npy_bytes(texts[offsets[i]:offsets[i + 1]]), "json": json.dumps(meta).encode()})
            batch.clear()

        for sample in iter_shard(src):
            batch.append(sample)
            if len(batch) == cfg.cache.batch_size:
                flush()
        if batch:
            flush()
    return tar.info


def cache(cfg: Config, data_dir: Path, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    started = time.time()
    data_manifest = read_json(data_dir / "manifest.json", "data manifest")
    fingerprint = cache_fingerprint(cfg, model_dir, data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    enc = LatentEncoder(model_dir, device_for_caching())
    shards, reused = [], 0
    for src in data_manifest["shards"]:
        name = src["name"]
        sidecar = out_dir / f"{name}.json"
        done = read_json(sidecar) if sidecar.is_file() else None
        if done and done["fingerprint"] == fingerprint["all"] and (out_dir / name).is_file() \
                and sha256_file(out_dir / name) == done["sha256"]:
            shards.append({k: done[k] for k in ("name", "count", "sha256")})
            reused += 1
            continue
        info = cache_shard(enc, cfg, data_dir / name, out_dir / name)
        write_json(sidecar, info | {"fingerprint": fingerprint["all"]})
        shards.append(info)
        print(f"cache: {name}: {info['count']} samples")
    null_text = enc.captions([""])[0]
    np.save(out_dir / "null_text.npy", null_text)
    count = sum(s["count"] for s in shards)
    latent_hw = cfg.cache.resolution // (2 ** (len(enc.vae.config.block_out_channels) - 1))
    manifest = {
        "count": count, "shards": shards, "fingerprint": fingerprint, "dtype": STORE_DTYPE,
        "latent_shape": [enc.vae.config.latent_channels, latent_hw, latent_hw], "text_shape": list(null_text.shape),
        "skipped": data_manifest.get("skipped", []), "reused_shards": reused,
        "seconds": round(time.time() - started, 1),
    }
    write_json(out_dir / "manifest.json", manifest)  # written last: its presence means complete
    print(f"cache: {count} samples, {len(shards)} shard(s) ({reused} reused) in {manifest['seconds']}s -> {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("cache", __doc__, argv, {"data": "prepared data folder", "model": "model folder", "out": "output folder"})
    cache(cfg, Path(args.data), Path(args.model), Path(args.out))


if __name__ == "__main__":
    run(main)
