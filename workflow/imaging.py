"""Image decode/resize/crop used at cache time (and by builtin:tiny's VAE fit, so both agree)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")


def decode_image(sample: dict) -> Image.Image:
    for key in IMAGE_KEYS:
        if key in sample:
            return Image.open(io.BytesIO(sample[key])).convert("RGB")
    raise ValueError(f"sample {sample.get('__key__')} has no image (expected one of {IMAGE_KEYS})")


def resize_crop(img: Image.Image, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the short side to `size` (high-quality downsampling), then crop a square: the
    center, or where `rng` puts it (random crops are drawn once, at cache time)."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    w, h = img.size
    if rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return img.crop((left, top, left + size, top + size))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (N, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
