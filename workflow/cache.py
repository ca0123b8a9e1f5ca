"""Stage `cache`: prepared images -> VAE posteriors + text embeddings in webdataset shards.

Per sample: `mean.npy` and `std.npy` (the VAE posterior, fp16, unscaled: training applies the VAE's
scaling and shift), shaped (variants, C, H, W) where variant 1 is the horizontally flipped image
when `cache.random_flip` is on; `text.npy` (last hidden state per caption, fp16, shape
(captions, tokens, dim)); and `json` (captions and source metadata). Beside the shards:
`null_text.npy` (the empty caption, for caption dropout) and `manifest.json` with `count`, `shards`,
shapes, `skipped` and the `fingerprint` that `train` checks against its own config.

Each output shard corresponds to one prepared shard and gets a sidecar `<shard>.json` (count,
sha256, fingerprint) once complete: a rerun after a crash skips shards already finished with the
same fingerprint. `cache.procs` processes (one per GPU on a GPU machine) split the shards.

    python -m workflow.cache --config config.yaml --data results/data/digits \
        --model resources/models/tiny-digits --out results/latents/digits/tiny-digits_32px
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .cli import run, stage_main
from .config import Config
from .fsutil import read_json, sha256_file, sha256_json, sha256_tree, write_json
from .imaging import decode_image, resize_crop
from .models import check_model_dir, load_text_encoder, load_tokenizer, load_vae
from .shards import AtomicTar, iter_shard, npy_bytes

CACHE_FORMAT = 2
STORE_DTYPE = "fp16"


def cache_fingerprint(cfg: Config, model_dir: Path, data_dir: Path) -> dict[str, str]:
    """Everything the cached tensors depend on, each part hashed so a mismatch can be named."""
    model_dir = check_model_dir(model_dir)
    parts = {
        "vae": sha256_tree(model_dir / "vae"),
        "text_encoder": sha256_tree(model_dir / "text_encoder"),
        "tokenizer": sha256_tree(model_dir / "tokenizer"),
        "resolution": str(cfg.cache.resolution),
        "crop": "center" if cfg.cache.center_crop else f"random(seed={cfg.train.seed})",
        "flip": str(cfg.cache.random_flip),
        "dtype": STORE_DTYPE,
        "data_manifest": sha256_file(data_dir / "manifest.json"),
        "format": str(CACHE_FORMAT),
    }
    parts["all"] = sha256_json(parts)
    return parts


def fingerprint_mismatch(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return [k for k in expected if k != "all" and expected.get(k) != found.get(k)]


class LatentEncoder:
    """Loads the VAE and text encoder once; encodes image batches and caption lists."""

    def __init__(self, model_dir: Path, device: torch.device):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.device, self.dtype = device, dtype
        torch.backends.cudnn.benchmark = True  # one batch shape throughout: pick the fastest kernels
        self._upload: dict = {}
        self._turn = 0
        self.vae = load_vae(model_dir, device, dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.text_encoder = load_text_encoder(model_dir, device, dtype)

    @torch.no_grad()
    def submit(self, pixels: np.ndarray, flip: bool, captions: list[str]) -> "PendingLatents":
        """Queue the encoding of uint8 (N, H, W, 3) pixels and of the captions; return at once. The uint8 batch
        travels to the device as is (scaling, layout and the flip happen there) and the results
        come back through pinned memory, so the device can work on this batch while the caller
        finishes the previous one."""
        x = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            x = self._pinned(x).to(self.device, non_blocking=True)
        # NHWC -> NCHW; contiguous, or the VAE runs channels-last, ~25% slower (GroupNorm).
        x = x.permute(0, 3, 1, 2).contiguous().to(self.dtype) / 127.5 - 1.0
        if flip:
            x = torch.cat([x, x.flip(3)])
        post = self.vae.encode(x).latent_dist
        out = torch.stack([post.mean, post.std]).half()  # one transfer for both
        return PendingLatents(out, self.text(captions).half(), 2 if flip else 1, self.device)

    def _pinned(self, x: torch.Tensor) -> torch.Tensor:
        # Two pinned upload buffers, reused alternately, so a batch is not re-pinned every time.
        # A buffer is reused only after its batch's results arrived (collect() waits for them).
        key = (tuple(x.shape), self._turn)
        self._turn ^= 1
        if key not in self._upload:
            self._upload[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return self._upload[key].copy_(x)

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        if self.device.type == "cuda":
            # A blocking upload would wait for the VAE work queued before it and stall the pipeline.
            ids = ids.pin_memory().to(self.device, non_blocking=True)
        return self.text_encoder(ids)[0]

    def captions(self, captions: list[str]) -> np.ndarray:
        return self.text(captions).half().cpu().numpy()


class PendingLatents:
    """Latents on their way back from the device; `result()` waits for them."""

    def __init__(self, latents: torch.Tensor, texts: torch.Tensor, variants: int, device: torch.device):
        self.variants = variants
        self.ready = None
        if device.type == "cuda":
            latents, texts = (self._to_pinned(t) for t in (latents, texts))
            self.ready = torch.cuda.Event()
            self.ready.record()
        self.latents, self.texts = latents, texts

    @staticmethod
    def _to_pinned(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, std) each (N, variants, C, h, w), and the caption embeddings; fp16."""
        if self.ready is not None:
            self.ready.synchronize()
        out = self.latents.unflatten(1, (self.variants, -1)).transpose(1, 2).cpu().numpy()
        return out[0], out[1], self.texts.cpu().numpy()


def crop_for(cfg: Config, key: str) -> np.random.Generator | None:
    """None for a center crop; else the generator that places this sample's random crop, drawn
    from (train.seed, sample key) so the crop is fixed at cache time and the same on every rerun."""
    return None if cfg.cache.center_crop else np.random.default_rng([cfg.train.seed, int(key)])


def decoded_batches(cfg: Config, src: Path, workers: int) -> Iterator[tuple[list[dict], np.ndarray]]:
    """(samples, uint8 pixels (N, H, W, 3)) per batch. Decode + resize + crop run in threads (PIL
    releases the GIL) a few batches ahead, so they overlap with the encoder instead of adding to it."""
    def load(sample: dict) -> np.ndarray:
        img = resize_crop(decode_image(sample), cfg.cache.resolution, crop_for(cfg, sample["__key__"]))
        return np.asarray(img, dtype=np.uint8)

    def chunks() -> Iterator[list[dict]]:
        batch: list[dict] = []
        for sample in iter_shard(src):
            batch.append(sample)
            if len(batch) == cfg.cache.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for batch in chunks():
            pending.append((batch, [pool.submit(load, s) for s in batch]))
            if len(pending) > 2:
                done, futures = pending.popleft()
                yield done, np.stack([f.result() for f in futures])
        while pending:
            done, futures = pending.popleft()
            yield done, np.stack([f.result() for f in futures])


def write_batch(tar: AtomicTar, batch: list[dict], metas: list[dict], means: np.ndarray, stds: np.ndarray,
                texts: np.ndarray) -> None:
    offsets = np.cumsum([0] + [len(m["captions"]) for m in metas])
    for i, (s, meta) in enumerate(zip(batch, metas)):
        tar.write({"__key__": s["__key__"], "mean.npy": npy_bytes(means[i]), "std.npy": npy_bytes(stds[i]),
                   "text.npy": npy_bytes(texts[offsets[i]:offsets[i + 1]]), "json": json.dumps(meta).encode()})


DECODE_THREADS = min(8, len(os.sched_getaffinity(0)))


def cache_shard(enc: LatentEncoder, cfg: Config, src: Path, dest: Path, workers: int = DECODE_THREADS) -> dict[str, Any]:
    """Encode one prepared shard into one latent shard (written atomically). While the device
    encodes batch k, this thread collects batch k-1 and a writer thread serializes it; decoding
    runs ahead in its own threads."""
    def collect(item) -> None:
        batch, pending, metas = item
        means, stds, texts = pending.result()
        writes.append(writer.submit(write_batch, tar, batch, metas, means, stds, texts))
        if len(writes) > 2:
            writes.pop(0).result()  # bounded memory; re-raises a write error here

    writes: list = []
    with AtomicTar(dest) as tar, ThreadPoolExecutor(1) as writer:
        previous = None
        for batch, pixels in decoded_batches(cfg, src, workers):
            metas = [json.loads(s["json"]) for s in batch]
            pending = enc.submit(pixels, cfg.cache.random_flip, [c for m in metas for c in m["captions"]])
            if previous is not None:
                collect(previous)
            previous = (batch, pending, metas)
        if previous is not None:
            collect(previous)
        for w in writes:
            w.result()
    return tar.info


def finished_shard(out_dir: Path, name: str, fingerprint: str) -> dict[str, Any] | None:
    sidecar = out_dir / f"{name}.json"
    if not sidecar.is_file() or not (out_dir / name).is_file():
        return None
    done = read_json(sidecar)
    if done.get("fingerprint") != fingerprint or sha256_file(out_dir / name) != done.get("sha256"):
        return None
    return {k: done[k] for k in ("name", "count", "sha256")}


# One encoder per worker process, loaded once by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, procs: int) -> None:
    index = (mp.current_process()._identity or (1,))[0] - 1
    if torch.cuda.is_available():
        device = torch.device("cuda", index % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // procs))
    _WORKER["enc"] = LatentEncoder(Path(model_dir), device)


def _cache_one(cfg_json: str, src: str, dest: str, fingerprint: str) -> dict[str, Any]:
    info = cache_shard(_WORKER["enc"], Config.model_validate_json(cfg_json), Path(src), Path(dest))
    write_json(Path(dest).parent / f"{info['name']}.json", info | {"fingerprint": fingerprint})
    return info


def cache_procs(cfg: Config) -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else cfg.cache.procs


def cache(cfg: Config, data_dir: Path, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    started = time.time()
    data_manifest = read_json(data_dir / "manifest.json", "data manifest")
    fingerprint = cache_fingerprint(cfg, model_dir, data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for leftover in out_dir.glob("*.tmp-*"):  # half-written by a killed run: never reused
        leftover.unlink()
    done = {s["name"]: finished_shard(out_dir, s["name"], fingerprint["all"]) for s in data_manifest["shards"]}
    todo = [s for s in data_manifest["shards"] if done[s["name"]] is None]
    procs = max(1, min(cache_procs(cfg), len(todo)))
    bar = tqdm(total=sum(s["count"] for s in todo), unit="img", desc="cache", mininterval=5)
    args = [(cfg.model_dump_json(), str(data_dir / s["name"]), str(out_dir / s["name"]), fingerprint["all"]) for s in todo]
    if procs == 1:
        _init_worker(str(model_dir), 1)
        for a in args:
            info = _cache_one(*a)
            done[info["name"]] = info
            bar.update(info["count"])
    elif args:
        # spawn: CUDA and forked parents do not mix; each worker loads the models once.
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(model_dir), procs)) as pool:
            for fut in as_completed([pool.submit(_cache_one, *a) for a in args]):
                info = fut.result()
                done[info["name"]] = info
                bar.update(info["count"])
    bar.close()

    # procs == 1 initialised this process's encoder above (always, even with nothing to do);
    # otherwise the workers held theirs and this process needs one for the null caption.
    enc = _WORKER["enc"] if procs == 1 else LatentEncoder(model_dir, torch.device("cpu"))
    null_text = enc.captions([""])[0]
    np.save(out_dir / "null_text.npy", null_text)
    shards = [done[s["name"]] for s in data_manifest["shards"]]
    count = sum(s["count"] for s in shards)
    latent_hw = cfg.cache.resolution // (2 ** (len(enc.vae.config.block_out_channels) - 1))
    seconds = time.time() - started
    manifest = {
        "count": count, "shards": shards, "fingerprint": fingerprint, "dtype": STORE_DTYPE,
        "variants": 2 if cfg.cache.random_flip else 1,
        "latent_shape": [enc.vae.config.latent_channels, latent_hw, latent_hw], "text_shape": list(null_text.shape),
        "skipped": data_manifest.get("skipped", []), "reused_shards": len(shards) - len(todo), "procs": procs,
        "seconds": round(seconds, 1), "images_per_s": round(sum(s["count"] for s in todo) / max(seconds, 1e-9), 1),
    }
    write_json(out_dir / "manifest.json", manifest)  # written last: its presence means complete
    print(f"cache: {count} samples, {len(shards)} shard(s) ({manifest['reused_shards']} reused, {procs} proc(s)) "
          f"in {manifest['seconds']}s -> {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("cache", __doc__, argv, {"data": "prepared data folder", "model": "model folder", "out": "output folder"})
    cache(cfg, Path(args.data), Path(args.model), Path(args.out))


if __name__ == "__main__":
    run(main)
