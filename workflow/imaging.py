"""Image decode/resize/crop used at cache time (and by builtin:tiny's VAE fit, so both agree)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")


def image_bytes(sample: dict) -> bytes:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise ValueError(f"sample {sample.get('__key__')} has no image (expected one of {IMAGE_KEYS})")


def decode_image(sample: dict) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(sample))).convert("RGB")


def image_size(sample: dict) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    return Image.open(io.BytesIO(image_bytes(sample))).size


def resize_crop(img: Image.Image, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    return resize_crop_at(img, (size, size), rng)[0]


def resize_crop_at(img: Image.Image, size: tuple[int, int], rng: np.random.Generator | None = None
                   ) -> tuple[Image.Image, np.ndarray]:
    """Resize to cover `size` (width, height) with high-quality downsampling (for a square: the
    short side to its side), then crop it: the center, or where `rng` puts it (random crops are
    drawn once, at cache time). Returns the crop and its size conditions (see size_conditions)."""
    tw, th = size
    original = img.size
    w, h = img.size
    scale = max(tw / w, th / h)
    img = img.resize((max(tw, round(w * scale)), max(th, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    w, h = img.size
    if rng is None:
        left, top = (w - tw) // 2, (h - th) // 2
    else:
        left, top = int(rng.integers(0, w - tw + 1)), int(rng.integers(0, h - th + 1))
    return img.crop((left, top, left + tw, top + th)), size_conditions(original, (w, h), (left, top), (tw, th))


def size_conditions(original_wh: tuple[int, int], resized_wh: tuple[int, int], left_top: tuple[int, int],
                    target_wh: tuple[int, int]) -> np.ndarray:
    """SDXL's `time_ids` of a crop, int32 (2, 6): (original height, width, crop top, crop left,
    target height, width), row 0 for the image, row 1 for its mirror image (the crop's left edge
    measured in the flipped image), for training with random_flip."""
    (ow, oh), (rw, _), (left, top), (tw, th) = original_wh, resized_wh, left_top, target_wh
    return np.array([[oh, ow, top, left, th, tw], [oh, ow, top, rw - left - tw, th, tw]], dtype=np.int32)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (N, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
