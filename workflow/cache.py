"""Stage `cache`: prepared images -> VAE posteriors + text embeddings in webdataset shards.

Per sample: `mean.npy` and `std.npy` (the VAE posterior, fp16, unscaled: training applies the VAE's
scaling and shift), shaped (variants, C, H, W) where variant 1 is the horizontally flipped image
when `cache.random_flip` is on; `text.npy` (per caption the hidden states the family conditions on,
fp16, shape (captions, tokens, dim): SDXL's two encoders concatenated); for SDXL `pooled.npy`
(captions, dim: the second encoder's projected pooled embedding); `size.npy` (variants, 6), int32:
original height and width, crop top and left, target height and width (SDXL's `time_ids`); and
`json` (captions and source metadata). Beside the shards: `null_text.npy` (and `null_pooled.npy`)
for caption dropout (the encoded empty caption; zeros for SDXL, see families.py) and
`manifest.json` with `count`, `shards`, shapes, `skipped` and the `fingerprint` that `train` checks
against its own config. A non-finite value (an fp16 VAE overflowing, as SDXL's does) stops the
stage with an error naming the sample.

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
from .auto import resolve_here
from .buckets import nearest_bucket, resolve_buckets, size_name
from .families import down_sampling, family_of, native_resolution
from .imaging import decode_image, image_size, resize_crop_at
from .models import PromptEncoder, check_model_dir, load_vae
from .shards import AtomicTar, iter_shard, npy_bytes

CACHE_FORMAT = 3
STORE_DTYPE = "fp16"


def cache_fingerprint(cfg: Config, model_dir: Path, data_dir: Path) -> dict[str, str]:
    """Everything the cached tensors depend on, each part hashed so a mismatch can be named."""
    model_dir = check_model_dir(model_dir)
    cfg = cfg.at_model_resolution(model_dir)  # the train stage checks the cache with its own config
    parts = {"vae": sha256_tree(model_dir / "vae")}
    for layout in family_of(model_dir).text_encoders:
        parts |= {name: sha256_tree(model_dir / name) for name in (layout.folder, layout.tokenizer)}
    parts |= {
        "resolution": str(cfg.cache.resolution),
        "buckets": ",".join(map(size_name, bucket_sizes(cfg, model_dir) or [])) or "none",
        "crop": "center" if cfg.cache.center_crop else f"random(seed={cfg.train.seed})",
        "flip": str(cfg.cache.random_flip),
        "dtype": STORE_DTYPE,
        "data_manifest": sha256_file(data_dir / "manifest.json"),
        "format": str(CACHE_FORMAT),
    }
    parts["all"] = sha256_json(parts)
    return parts


def bucket_sizes(cfg: Config, model_dir: Path) -> list[tuple[int, int]] | None:
    """cache.buckets resolved for this model: (width, height) sizes, or None for square crops."""
    c = cfg.at_model_resolution(model_dir).cache
    return resolve_buckets(c.buckets, c.resolution, c.max_aspect, model_dir, c.bucket_step)


def fingerprint_mismatch(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return [k for k in expected if k != "all" and expected.get(k) != found.get(k)]


class LatentEncoder:
    """Loads the VAE and text encoder(s) once; encodes image batches and caption lists. On a GPU
    in the family's dtype (fp16; FLUX bf16), except a VAE whose config says `force_upcast` (SDXL's
    overflows in fp16): fp32."""

    def __init__(self, model_dir: Path, device: torch.device):
        dtype = family_of(model_dir).inference_dtype(device)
        self.device, self.model_dir = device, Path(model_dir)
        torch.backends.cudnn.benchmark = True  # one batch shape throughout: pick the fastest kernels
        self._upload: dict = {}
        self._turn = 0
        self.vae = load_vae(model_dir, device, dtype)
        if self.vae.config.get("force_upcast", False) and dtype != torch.float32:
            self.vae.to(torch.float32)
        self.dtype = self.vae.dtype
        self.prompts = PromptEncoder(model_dir, device, dtype)

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
        out = torch.stack([post.mean, post.std]).half()  # one transfer for both; stored in fp16
        return PendingLatents(out, *self.text(captions), 2 if flip else 1, self.device)

    def _pinned(self, x: torch.Tensor) -> torch.Tensor:
        # Two pinned upload buffers, reused alternately, so a batch is not re-pinned every time.
        # A buffer is reused only after its batch's results arrived (collect() waits for them).
        key = (tuple(x.shape), self._turn)
        self._turn ^= 1
        if key not in self._upload:
            self._upload[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return self._upload[key].copy_(x)

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = self.prompts(captions)
        return hidden.half(), None if pooled is None else pooled.half()


class PendingLatents:
    """Latents on their way back from the device; `result()` waits for them."""

    def __init__(self, latents: torch.Tensor, texts: torch.Tensor, pooled: torch.Tensor | None, variants: int,
                 device: torch.device):
        self.variants = variants
        self.ready = None
        if device.type == "cuda":
            latents, texts = (self._to_pinned(t) for t in (latents, texts))
            pooled = None if pooled is None else self._to_pinned(pooled)
            self.ready = torch.cuda.Event()
            self.ready.record()
        self.latents, self.texts, self.pooled = latents, texts, pooled

    @staticmethod
    def _to_pinned(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def result(self) -> dict[str, np.ndarray]:
        """mean and std, each (N, variants, C, h, w), and the caption embeddings (text, pooled); fp16."""
        if self.ready is not None:
            self.ready.synchronize()
        out = self.latents.unflatten(1, (self.variants, -1)).transpose(1, 2).cpu().numpy()
        encoded = {"mean": out[0], "std": out[1], "text": self.texts.cpu().numpy()}
        return encoded | ({} if self.pooled is None else {"pooled": self.pooled.cpu().numpy()})


def crop_for(cfg: Config, key: str) -> np.random.Generator | None:
    """None for a center crop; else the generator that places this sample's random crop, drawn
    from (train.seed, sample key) so the crop is fixed at cache time and the same on every rerun."""
    return None if cfg.cache.center_crop else np.random.default_rng([cfg.train.seed, int(key)])


def decoded_batches(cfg: Config, src: Path, workers: int, sizes: list[tuple[int, int]] | None = None
                    ) -> Iterator[tuple[list[dict], np.ndarray, np.ndarray, int]]:
    """(samples, uint8 pixels (N, H, W, 3), size conditions (N, 2, 6), bucket index) per batch; every
    batch is of one bucket (`sizes`; default the cache.resolution square). Decode + resize + crop
    run in threads (PIL releases the GIL) a few batches ahead, so they overlap with the encoder
    instead of adding to it."""
    sizes = sizes or [(cfg.cache.resolution, cfg.cache.resolution)]

    def load(sample: dict, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        img, conds = resize_crop_at(decode_image(sample), sizes[bucket], crop_for(cfg, sample["__key__"]))
        return np.asarray(img, dtype=np.uint8), conds

    def chunks() -> Iterator[tuple[int, list[dict]]]:
        # One open batch per bucket (bounded memory); each leaves when full, the rest at the end.
        open_batches: dict[int, list[dict]] = {}
        for sample in iter_shard(src):
            bucket = nearest_bucket(*image_size(sample), sizes) if len(sizes) > 1 else 0
            batch = open_batches.setdefault(bucket, [])
            batch.append(sample)
            if len(batch) == cfg.cache.batch_size:
                yield bucket, open_batches.pop(bucket)
        for bucket in sorted(open_batches):
            yield bucket, open_batches[bucket]

    def stacked(done: list[dict], bucket: int, futures: list) -> tuple[list[dict], np.ndarray, np.ndarray, int]:
        loaded = [f.result() for f in futures]
        return done, np.stack([px for px, _ in loaded]), np.stack([sz for _, sz in loaded]), bucket

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for bucket, batch in chunks():
            pending.append((batch, bucket, [pool.submit(load, s, bucket) for s in batch]))
            if len(pending) > 2:
                yield stacked(*pending.popleft())
        while pending:
            yield stacked(*pending.popleft())


class NonFiniteLatents(ValueError):
    """The encoders gave inf/NaN for a sample: training on it would silently ruin the model."""


def write_batch(tar: AtomicTar, src: Path, batch: list[dict], metas: list[dict], encoded: dict[str, np.ndarray],
                sizes: np.ndarray, variants: int) -> None:
    offsets = np.cumsum([0] + [len(m["captions"]) for m in metas])
    for i, (s, meta) in enumerate(zip(batch, metas)):
        per_caption = slice(offsets[i], offsets[i + 1])
        arrays = {"mean": encoded["mean"][i], "std": encoded["std"][i], "text": encoded["text"][per_caption]}
        if "pooled" in encoded:
            arrays["pooled"] = encoded["pooled"][per_caption]
        bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
        if bad:
            raise NonFiniteLatents(
                f"sample {s['__key__']} of {src}: non-finite {', '.join(bad)} from the encoders (an fp16 VAE "
                f"overflowing? SDXL's VAE needs fp32 (force_upcast in its config) or an fp16-fix VAE as model.vae)")
        tar.write({"__key__": s["__key__"], **{f"{name}.npy": npy_bytes(a) for name, a in arrays.items()},
                   "size.npy": npy_bytes(sizes[i, :variants]), "json": json.dumps(meta).encode()})


DECODE_THREADS = min(8, len(os.sched_getaffinity(0)))


def cache_shard(enc: LatentEncoder, cfg: Config, src: Path, dest: Path, workers: int = DECODE_THREADS,
                sizes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Encode one prepared shard into one latent shard (written atomically); with buckets (`sizes`)
    the info lists each stored sample's bucket (`bucket_of`, in stored order). While the device
    encodes batch k, this thread collects batch k-1 and a writer thread serializes it; decoding
    runs ahead in its own threads."""
    cfg = cfg.at_model_resolution(enc.model_dir)

    def collect(item) -> None:
        batch, pending, metas, sizes = item
        writes.append(writer.submit(write_batch, tar, src, batch, metas, pending.result(), sizes, pending.variants))
        if len(writes) > 2:
            writes.pop(0).result()  # bounded memory; re-raises a write error here

    writes: list = []
    bucket_of: list[int] = []
    with AtomicTar(dest) as tar, ThreadPoolExecutor(1) as writer:
        previous = None
        for batch, pixels, conds, bucket in decoded_batches(cfg, src, workers, sizes):
            metas = [json.loads(s["json"]) for s in batch]
            pending = enc.submit(pixels, cfg.cache.random_flip, [c for m in metas for c in m["captions"]])
            bucket_of += [bucket] * len(batch)  # the writer keeps batch order
            if previous is not None:
                collect(previous)
            previous = (batch, pending, metas, conds)
        if previous is not None:
            collect(previous)
        for w in writes:
            w.result()
    return tar.info | ({"bucket_of": bucket_of} if sizes else {})


def finished_shard(out_dir: Path, name: str, fingerprint: str) -> dict[str, Any] | None:
    sidecar = out_dir / f"{name}.json"
    if not sidecar.is_file() or not (out_dir / name).is_file():
        return None
    done = read_json(sidecar)
    if done.get("fingerprint") != fingerprint or sha256_file(out_dir / name) != done.get("sha256"):
        return None
    return {k: done[k] for k in ("name", "count", "sha256", "bucket_of") if k in done}


# One encoder per worker process, loaded once by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, procs: int, sizes: list[tuple[int, int]] | None) -> None:
    index = (mp.current_process()._identity or (1,))[0] - 1
    if torch.cuda.is_available():
        device = torch.device("cuda", index % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // procs))
    _WORKER["enc"] = LatentEncoder(Path(model_dir), device)
    _WORKER["sizes"] = sizes


def _cache_one(cfg_json: str, src: str, dest: str, fingerprint: str) -> dict[str, Any]:
    info = cache_shard(_WORKER["enc"], Config.model_validate_json(cfg_json), Path(src), Path(dest),
                       sizes=_WORKER["sizes"])
    write_json(Path(dest).parent / f"{info['name']}.json", info | {"fingerprint": fingerprint})
    return info


def cache_procs(cfg: Config) -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else cfg.cache.procs


def cache(cfg: Config, data_dir: Path, model_dir: Path, out_dir: Path, prior_dir: Path | None = None) -> dict[str, Any]:
    """The data set's latents into `out_dir`, and the prior images' (prepared with it, data_dir/prior,
    or generated, `prior_dir`) into out_dir/prior."""
    from tqdm import tqdm

    started = time.time()
    cfg = resolve_here(cfg.at_model_resolution(model_dir), model_dir)
    data_manifest = read_json(data_dir / "manifest.json", "data manifest")
    sizes = bucket_sizes(cfg, model_dir)
    fingerprint = cache_fingerprint(cfg, model_dir, data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for leftover in out_dir.glob("*.tmp-*"):  # half-written by a killed run: never reused
        leftover.unlink()
    prior = None
    if prior_dir is None and "prior" in data_manifest:
        prior_dir = data_dir / "prior"
    if prior_dir is not None:  # data.prior: cached the same way into prior/, before this manifest
        prior = cache(cfg, prior_dir, model_dir, out_dir / "prior")
    done = {s["name"]: finished_shard(out_dir, s["name"], fingerprint["all"]) for s in data_manifest["shards"]}
    todo = [s for s in data_manifest["shards"] if done[s["name"]] is None]
    procs = max(1, min(cache_procs(cfg), len(todo)))
    bar = tqdm(total=sum(s["count"] for s in todo), unit="img", desc="cache", mininterval=5)
    args = [(cfg.model_dump_json(), str(data_dir / s["name"]), str(out_dir / s["name"]), fingerprint["all"]) for s in todo]
    if procs == 1:
        _init_worker(str(model_dir), 1, sizes)
        for a in args:
            info = _cache_one(*a)
            done[info["name"]] = info
            bar.update(info["count"])
    elif args:
        # spawn: CUDA and forked parents do not mix; each worker loads the models once.
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(model_dir), procs, sizes)) as pool:
            for fut in as_completed([pool.submit(_cache_one, *a) for a in args]):
                info = fut.result()
                done[info["name"]] = info
                bar.update(info["count"])
    bar.close()

    # procs == 1 initialised this process's encoder above (always, even with nothing to do);
    # otherwise the workers held theirs and this process needs one for the null caption.
    enc = _WORKER["enc"] if procs == 1 else LatentEncoder(model_dir, torch.device("cpu"))
    null_text, null_pooled = (None if t is None else t.half().cpu().numpy() for t in enc.prompts.null_caption())
    np.save(out_dir / "null_text.npy", null_text)
    if null_pooled is not None:
        np.save(out_dir / "null_pooled.npy", null_pooled)
    shards = [done[s["name"]] for s in data_manifest["shards"]]
    count = sum(s["count"] for s in shards)
    factor = down_sampling(model_dir, "vae")
    channels = enc.vae.config.latent_channels
    seconds = time.time() - started
    manifest = {
        "count": count, "shards": shards, "fingerprint": fingerprint, "dtype": STORE_DTYPE,
        "variants": 2 if cfg.cache.random_flip else 1,
        "latent_shape": None if sizes else [channels, cfg.cache.resolution // factor, cfg.cache.resolution // factor],
        "buckets": None if not sizes else [
            {"size": list(size), "latent_shape": [channels, size[1] // factor, size[0] // factor],
             "count": sum(s["bucket_of"].count(i) for s in shards)} for i, size in enumerate(sizes)],
        "text_shape": list(null_text.shape),
        "pooled_shape": None if null_pooled is None else list(null_pooled.shape), "family": family_of(model_dir).name,
        "skipped": data_manifest.get("skipped", []), "reused_shards": len(shards) - len(todo), "procs": procs,
        "seconds": round(seconds, 1), "images_per_s": round(sum(s["count"] for s in todo) / max(seconds, 1e-9), 1),
    }
    native = native_resolution(model_dir)
    manifest["resolution"], manifest["native_resolution"] = cfg.cache.resolution, native
    if prior:
        manifest["prior"] = {"count": prior["count"], "fingerprint": prior["fingerprint"]["all"]}
    if not native / 2 <= cfg.cache.resolution <= native * 2:
        print(f"cache: WARNING cache.resolution {cfg.cache.resolution} is far from this model's own {native} px (its "
              f"UNet's sample size x the VAE's down-sampling): it will generate poorly at its own size; set "
              f"cache__resolution=auto (= {native}) unless this is meant", flush=True)
    write_json(out_dir / "manifest.json", manifest)  # written last: its presence means complete
    print(f"cache: {count} samples, {len(shards)} shard(s) ({manifest['reused_shards']} reused, {procs} proc(s)) "
          f"in {manifest['seconds']}s -> {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("cache", __doc__, argv, {"data": "prepared data folder", "model": "model folder", "out": "output folder"},
                           {"prior": "generated prior images (data.prior.source generate): their prepared folder"})
    cache(cfg, Path(args.data), Path(args.model), Path(args.out), Path(args.prior) if args.prior else None)


if __name__ == "__main__":
    run(main)
