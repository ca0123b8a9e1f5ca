"""Stage `prepare`: a data source -> normalized raw shards + manifest.json.

Sources (`data.source`):
  builtin:digits        scikit-learn's 1797 handwritten digits, upscaled, "a handwritten digit N"
  imagefolder:<dir>     images + metadata.jsonl (`file_name` + `text` or `caption`)

Each sample is stored as its original image bytes (`<ext>`) plus `json` with `captions` (a list) and
optional `label`. Images that do not decode or have no caption are listed under `skipped`.

    python -m workflow.prepare --config config.yaml --out results/data/digits
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .cli import run, stage_main
from .config import Config
from .fsutil import atomic_dir, write_json
from .shards import write_shards

DIGITS_SIZE = 64  # 8x8 source pixels are upscaled to this before storing
IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".bmp": "bmp"}


def render_digit(pixels_8x8: np.ndarray, size: int = DIGITS_SIZE) -> Image.Image:
    """sklearn digit (0..16, ink high) -> dark ink on white RGB, smoothly upscaled."""
    gray = (255 - pixels_8x8.reshape(8, 8) * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def digits_samples() -> Iterator[dict[str, Any]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.data, digits.target)):
        meta = {"captions": [f"a handwritten digit {int(label)}"], "label": int(label), "source_id": i}
        yield {"__key__": f"{i:06d}", "png": png_bytes(render_digit(pixels)), "json": json.dumps(meta).encode()}


def read_imagefolder_metadata(root: Path) -> list[dict[str, Any]]:
    meta_path = root / "metadata.jsonl"
    if not meta_path.is_file():
        raise FileNotFoundError(f"image folder {root} has no metadata.jsonl (one JSON line per image: file_name + text)")
    rows = []
    for n, line in enumerate(meta_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise ValueError(f"{meta_path}:{n}: each line needs a 'file_name' key")
        rows.append(row)
    return rows


def imagefolder_samples(root: Path, skipped: list[dict[str, str]], strict: bool) -> Iterator[dict[str, Any]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    for i, row in enumerate(read_imagefolder_metadata(root)):
        name = row["file_name"]
        path = root / name
        caption = row.get("text", row.get("caption"))
        captions = caption if isinstance(caption, list) else [caption] if caption else []
        ext = IMAGE_EXTS.get(path.suffix.lower())
        reason = None
        if not captions:
            reason = "no caption ('text' or 'caption')"
        elif ext is None:
            reason = f"unsupported image type {path.suffix!r}"
        elif not path.is_file():
            reason = "file not found"
        if reason is None:
            data = path.read_bytes()
            reason = decode_error(data)
        if reason:
            if strict:
                raise ValueError(f"{path}: {reason} (data.strict is on)")
            print(f"prepare: skipped {name}: {reason}", file=sys.stderr)
            skipped.append({"item": name, "reason": reason})
            continue
        meta = {"captions": [str(c) for c in captions], "file_name": name}
        yield {"__key__": f"{i:06d}", ext: data, "json": json.dumps(meta).encode()}


def decode_error(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:
        return f"image does not decode: {e}"
    return None


def prepare(cfg: Config, out_dir: Path) -> dict[str, Any]:
    scheme, _, arg = cfg.data.source.partition(":")
    skipped: list[dict[str, str]] = []
    if scheme == "builtin":
        if arg != "digits":
            raise ValueError(f"data.source: unknown builtin data set {arg!r}; available: digits")
        samples = digits_samples()
    else:
        samples = imagefolder_samples(Path(arg).expanduser(), skipped, cfg.data.strict)
    with atomic_dir(out_dir) as tmp:
        shards = write_shards(samples, tmp, cfg.data.shard_size)
        count = sum(s["count"] for s in shards)
        if count == 0:
            raise ValueError(f"data.source {cfg.data.source}: no usable images ({len(skipped)} skipped: {skipped[:3]})")
        manifest = {"source": cfg.data.source, "count": count, "shards": shards, "skipped": skipped}
        write_json(tmp / "manifest.json", manifest)
    print(f"prepare: {count} samples in {len(shards)} shard(s), {len(skipped)} skipped -> {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("prepare", __doc__, argv, {"out": "output folder (manifest.json + shards)"})
    prepare(cfg, Path(args.out))


if __name__ == "__main__":
    run(main)
