"""Data sources for `prepare`: each yields normalized samples (image bytes + captions).

  builtin:digits       scikit-learn's 1797 handwritten digits, upscaled, "a handwritten digit N"
  builtin:digits-aspect  the same digits stretched to non-square images, alternately 72x48 (wide)
                       and 48x72 (tall), for aspect-ratio buckets
  builtin:sevens       12 of those digits, all sevens, without captions: a DreamBooth-style
                       instance set (caption them with data.caption)
  imagefolder:<dir>    images in <dir> (nested folders too) captioned by metadata.jsonl or
                       metadata.csv (`file_name` + caption column, the diffusers convention) or by
                       a kohya-style `<stem>.txt` beside each image
  hf:<id or path>      a `datasets` data set (parquet/arrow folder, save_to_disk output or Hub id)
  wds:<tar pattern>    webdataset tars as img2dataset writes them (key.jpg|png|webp, key.txt, key.json)

A sample is {"__key__", "<ext>": image bytes, "json": {"captions": [...], ...}}. Anything unusable
is appended to `skipped` with a reason (or raises with data.strict), never silently dropped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from .config import DataConfig

DIGITS_SIZE = 64  # 8x8 source pixels are upscaled to this before storing
IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".bmp": "bmp"}
CAPTION_KEYS = ("text", "caption")  # tried in order when data.caption_column is not set
FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}


class Skipper:
    """Collects unusable items with reasons; in strict mode the first one is an error."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.items: list[dict[str, str]] = []

    def __call__(self, item: str, reason: str) -> None:
        if self.strict:
            raise ValueError(f"{item}: {reason} (data.strict is on)")
        print(f"prepare: skipped {item}: {reason}", file=sys.stderr)
        self.items.append({"item": item, "reason": reason})


def decode_error(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:
        return f"image does not decode: {e}"
    return None


def image_ext(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return FORMAT_EXT.get(im.format or "")
    except Exception:
        return None


def as_captions(value: Any) -> list[str]:
    """A caption column value (a string or a list of strings) -> non-empty captions."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def apply_caption(rule: str | None, captions: list[str]) -> list[str]:
    """data.caption applied to an image's own captions: a plain text captions the images that have
    none (DreamBooth's "a photo of sks dog"); a template with {caption} wraps each caption (an image
    without one keeps none: there is nothing to put in)."""
    if rule is None:
        return captions
    if "{caption}" in rule:
        return [rule.replace("{caption}", c) for c in captions]
    return captions or [rule]


def make_sample(index: int, item: str, data: bytes | None, ext: str | None, captions: list[str], meta: dict,
                skip: Skipper, caption: str | None = None) -> dict[str, Any] | None:
    """Validate one item (its captions through data.caption); a sample, or None after recording why
    it was skipped."""
    reason = None
    captions = apply_caption(caption, captions)
    if data is None:
        reason = "file not found"
    elif not captions:
        reason = "no caption" + (" for data.caption's {caption}" if caption else "")
    elif ext is None:
        reason = "unsupported image type"
    else:
        reason = decode_error(data)
    if reason:
        skip(item, reason)
        return None
    meta = {"captions": captions, **meta}
    return {"__key__": f"{index:08d}", ext: data, "json": json.dumps(meta).encode()}


# ---------------------------------------------------------------- builtin:digits


def render_digit(pixels_8x8: np.ndarray, size: int | tuple[int, int] = DIGITS_SIZE) -> Image.Image:
    """sklearn digit (0..16, ink high) -> dark ink on white RGB, smoothly upscaled (to a side, or
    stretched to (width, height))."""
    gray = (255 - pixels_8x8.reshape(8, 8) * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").resize(size if isinstance(size, tuple) else (size, size), Image.BICUBIC).convert("RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


ASPECT_SIZES = ((72, 48), (48, 72))  # builtin:digits-aspect, alternately


SEVENS = 12  # builtin:sevens: the first 12 sevens, uncaptioned (a DreamBooth-style instance set)


def builtin_samples(name: str, cfg: DataConfig, skip: Skipper) -> Iterator[dict[str, Any]]:
    if name not in ("digits", "digits-aspect", "sevens"):
        raise ValueError(f"data.source: unknown builtin data set {name!r}; available: builtin:digits, "
                         f"builtin:digits-aspect, builtin:sevens")
    from sklearn.datasets import load_digits

    digits = load_digits()
    if name == "sevens":
        sevens = [i for i, label in enumerate(digits.target) if label == 7][:SEVENS]
        for n, i in enumerate(sevens):
            sample = make_sample(n, f"seven {n}", png_bytes(render_digit(digits.data[i])), "png", [],
                                 {"label": 7, "source_id": i}, skip, cfg.caption)
            if sample:
                yield sample
        return
    for i, (pixels, label) in enumerate(zip(digits.data, digits.target)):
        meta = {"label": int(label), "source_id": i}
        size = ASPECT_SIZES[i % 2] if name == "digits-aspect" else DIGITS_SIZE
        if name == "digits-aspect":
            meta["size"] = f"{size[0]}x{size[1]}"
        image = render_digit(pixels, size)
        sample = make_sample(i, f"digit {i}", png_bytes(image), "png", [f"a handwritten digit {int(label)}"], meta, skip,
                             cfg.caption)
        if sample:
            yield sample


# ---------------------------------------------------------------- imagefolder:<dir>


def pick_caption(row: dict[str, Any], column: str | None, where: str) -> Any:
    if column:
        if column not in row:
            raise ValueError(f"{where}: no caption column {column!r} (data.caption_column); columns: {sorted(row)}")
        return row[column]
    return next((row[k] for k in CAPTION_KEYS if k in row), None)


def read_metadata(meta_path: Path, column: str | None) -> dict[Path, list[str]]:
    """metadata.jsonl or metadata.csv -> {image path: captions}; file names are relative to it."""
    rows: list[tuple[str, dict]] = []
    if meta_path.suffix == ".jsonl":
        for n, line in enumerate(meta_path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{meta_path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{meta_path}:{n}: not valid JSON ({e})") from None
    else:
        with open(meta_path, newline="") as f:
            rows = [(f"{meta_path}:{n}", row) for n, row in enumerate(csv.DictReader(f), 2)]
    out: dict[Path, list[str]] = {}
    for where, row in rows:
        if not isinstance(row, dict) or "file_name" not in row:
            raise ValueError(f"{where}: each row needs a 'file_name' (and a caption column)")
        out[(meta_path.parent / row["file_name"]).resolve()] = as_captions(pick_caption(row, column, where))
    return out


def imagefolder_samples(arg: str, cfg: DataConfig, skip: Skipper) -> Iterator[dict[str, Any]]:
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    captions: dict[Path, list[str]] = {}
    for meta_path in sorted([*root.rglob("metadata.jsonl"), *root.rglob("metadata.csv")]):
        captions |= read_metadata(meta_path, cfg.caption_column)
    images = sorted(p.resolve() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    listed = set(images) | set(captions)
    if not listed:
        raise ValueError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    for i, path in enumerate(sorted(listed)):
        caps = captions.get(path)
        sidecar = path.with_suffix(".txt")
        if caps is None and sidecar.is_file():  # kohya-style: one caption per line
            caps = as_captions(sidecar.read_text().splitlines())
        name = str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve()) else str(path)
        data = path.read_bytes() if path.is_file() else None
        sample = make_sample(i, name, data, IMAGE_EXTS.get(path.suffix.lower()), caps or [], {"file_name": name}, skip,
                             cfg.caption)
        if sample:
            yield sample


# ---------------------------------------------------------------- hf:<id or path>


def load_hf(arg: str, split: str):
    import datasets

    path = Path(arg).expanduser()
    try:
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path) if path.exists() else arg)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"data.source hf:{arg}: could not load it with datasets: {e}") from e
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if split not in ds:
            raise ValueError(f"data.source hf:{arg}: no split {split!r} (data.split); splits: {sorted(ds)}")
        ds = ds[split]
    return ds


def hf_samples(arg: str, cfg: DataConfig, skip: Skipper) -> Iterator[dict[str, Any]]:
    import datasets

    ds = load_hf(arg, cfg.split)
    columns = list(ds.column_names)
    image_col = cfg.image_column or "image"
    caption_col = cfg.caption_column or next((c for c in CAPTION_KEYS if c in columns), None)
    for what, col, key in (("image", image_col, "data.image_column"), ("caption", caption_col, "data.caption_column")):
        if col is None and what == "caption" and cfg.caption and "{caption}" not in cfg.caption:
            continue  # no caption column: data.caption captions every image
        if col not in columns:
            raise ValueError(f"data.source hf:{arg}: no {what} column {col!r} ({key}); columns: {columns}")
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # keep the original bytes
    for i, row in enumerate(ds):
        value = row[image_col]
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is None and isinstance(value, dict) and value.get("path"):
            p = Path(value["path"])
            data = p.read_bytes() if p.is_file() else None
        captions = as_captions(row[caption_col]) if caption_col else []
        sample = make_sample(i, f"row {i}", data, image_ext(data) if data else None, captions, {"row": i}, skip,
                             cfg.caption)
        if sample:
            yield sample


# ---------------------------------------------------------------- wds:<tar pattern>


def wds_samples(arg: str, cfg: DataConfig, skip: Skipper) -> Iterator[dict[str, Any]]:
    import glob

    import braceexpand

    from .shards import iter_shard

    # Brace ranges as img2dataset names them ({00000..00099}), and shell globs.
    paths = [Path(p) for pattern in braceexpand.braceexpand(os.path.expanduser(arg))
             for p in (sorted(glob.glob(pattern)) or [pattern])]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"data.source wds:{arg}: tar file(s) not found: {', '.join(missing[:5])}")
    i = 0
    for tar in paths:
        for raw in iter_shard(tar):
            item = f"{Path(tar).name}:{raw['__key__']}"
            ext = next((k for k in ("jpg", "jpeg", "png", "webp") if k in raw), None)
            meta = json.loads(raw["json"]) if "json" in raw else {}
            caps = as_captions(raw["txt"].decode()) if "txt" in raw else as_captions(pick_caption(meta, cfg.caption_column, item))
            sample = make_sample(i, item, raw.get(ext) if ext else b"", "jpg" if ext == "jpeg" else ext, caps,
                                 {"wds_key": raw["__key__"], "wds_tar": Path(tar).name}, skip, cfg.caption)
            i += 1
            if sample:
                yield sample


SOURCES: dict[str, Callable[[str, DataConfig, Skipper], Iterator[dict[str, Any]]]] = {
    "builtin": builtin_samples,
    "imagefolder": imagefolder_samples,
    "hf": hf_samples,
    "wds": wds_samples,
}


def iter_source(cfg: DataConfig, skip: Skipper) -> Iterator[dict[str, Any]]:
    scheme, _, arg = cfg.source.partition(":")
    return SOURCES[scheme](arg, cfg, skip)
