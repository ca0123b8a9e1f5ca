"""What the bench scripts share: synthetic photo-like JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpegs(folder: Path, n: int, size: tuple[int, int] | list[tuple[int, int]], seed: int = 0) -> None:
    """Photo-like JPEGs (smooth gradients + noise; pure noise would compress unrealistically), of
    `size` or of each size in a list in turn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    sizes = size if isinstance(size, list) else [size]
    grids = {(w, h): np.mgrid[0:h, 0:w].astype(np.float32) for w, h in sizes}
    with open(folder / "metadata.jsonl", "w") as meta:
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            yy, xx = grids[(w, h)]
            base = np.stack([np.sin(xx / (20 + 10 * c + i % 7)) + np.cos(yy / (30 + 5 * c)) for c in range(3)], -1)
            img = (127 + 60 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
            meta.write(json.dumps({"file_name": f"{i:05d}.jpg", "text": f"a synthetic photo number {i}"}) + "\n")
