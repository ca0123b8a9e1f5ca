"""Aspect-ratio buckets: which sizes images are cropped to, and which bucket each image goes to.

`cache.buckets`:
- null: every image is resized and cropped to a `cache.resolution` square (no buckets);
- auto: sizes of about `cache.resolution`² pixels whose sides are multiples of the model's latent
  step (the VAE's down-sampling times the UNet's: 64 for SD 1.x/2.x, 32 for SDXL; or
  `cache.bucket_step`, a multiple of it: config/sdxl.yaml takes SDXL's usual 64) and whose aspect
  ratio is at most `cache.max_aspect`: for each width w on the step grid, the tallest height h on the
  grid with w x h <= resolution², both orientations;
- a list such as [512x768, 768x512, 640x640] (width x height, each side a multiple of the step).

Each image goes to the bucket whose aspect ratio is nearest its own (in log ratio, so 2:1 and 1:2
are equally far from 1:1), is resized to cover it, and cropped (center or random) to it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .families import down_sampling, family_of

SIZE = re.compile(r"([1-9]\d*)x([1-9]\d*)")


def parse_size(text: str | int) -> tuple[int, int]:
    """"WxH" (or a square's side) -> (width, height)."""
    if isinstance(text, int):
        return text, text
    m = SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size: write it as WIDTHxHEIGHT, e.g. 768x512")
    return int(m.group(1)), int(m.group(2))


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def latent_step(model_dir: str | Path) -> int:
    """The pixel step bucket sides must be multiples of: the VAE's down-sampling times the denoiser's
    (a UNet's down-sampling, FLUX's 2x2 patches)."""
    return down_sampling(model_dir, "vae") * family_of(model_dir).latent_multiple(Path(model_dir))


def auto_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """Sizes of area <= resolution² on the step grid, aspect ratio <= max_aspect, widest first."""
    area = resolution * resolution
    sizes = set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            sizes |= {(w, h), (h, w)}
    # Of sizes with the same aspect ratio keep the largest (on the grid there are few duplicates).
    best: dict[float, tuple[int, int]] = {}
    for w, h in sizes:
        key = round(w / h, 6)
        if key not in best or w * h > best[key][0] * best[key][1]:
            best[key] = (w, h)
    return sorted(best.values(), key=lambda s: (-s[0] / s[1], -s[0] * s[1]))


def resolve_buckets(buckets: str | list[str] | None, resolution: int, max_aspect: float,
                    model_dir: str | Path, bucket_step: int | None = None) -> list[tuple[int, int]] | None:
    """cache.buckets as sizes for this model; a listed size off the model's step grid is an error.
    `bucket_step` (cache.bucket_step) spaces auto buckets more coarsely than the model's step."""
    if buckets is None:
        return None
    step = latent_step(model_dir)
    if bucket_step and bucket_step % step:
        raise ValueError(f"cache.bucket_step {bucket_step} is not a multiple of {step} (this model's VAE times UNet "
                         f"down-sampling)")
    if buckets == "auto":
        step = bucket_step or step
        return auto_buckets(resolution, step, max_aspect)
    sizes = [parse_size(b) for b in buckets]
    off = [size_name(s) for s in sizes if s[0] % step or s[1] % step]
    if off:
        raise ValueError(f"cache.buckets: {', '.join(off)} not multiples of {step} (this model's VAE times UNet "
                         f"down-sampling), so the UNet cannot take them")
    return sizes


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (ties: the first listed)."""
    aspect = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][0] / sizes[i][1]) - aspect))
