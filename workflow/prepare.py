"""Stage `prepare`: a data source -> normalized raw shards + manifest.json.

Sources (`data.source`, see workflow/sources.py): builtin:digits, imagefolder:<dir>,
hf:<id or path>, wds:<tar pattern>. Each sample is stored as its original image bytes (`<ext>`)
plus `json` with `captions` (all of them) and source metadata. The manifest lists `count`, the
shards with their sha256, the `source`, and every `skipped` item with its reason.

    python -m workflow.prepare --config config.yaml --out results/data/digits
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cli import run, stage_main
from .config import Config
from .fsutil import atomic_dir, write_json
from .shards import write_shards
from .sources import Skipper, iter_source


def prepare(cfg: Config, out_dir: Path) -> dict[str, Any]:
    skip = Skipper(cfg.data.strict)
    samples = iter_source(cfg.data, skip)
    with atomic_dir(out_dir) as tmp:
        shards = write_shards(samples, tmp, cfg.data.shard_size)
        count = sum(s["count"] for s in shards)
        if count == 0:
            raise ValueError(f"data.source {cfg.data.source}: no usable images ({len(skip.items)} skipped, "
                             f"e.g. {skip.items[:3]})")
        manifest = {"source": cfg.data.source, "count": count, "shards": shards, "skipped": skip.items}
        write_json(tmp / "manifest.json", manifest)
    print(f"prepare: {count} samples in {len(shards)} shard(s), {len(skip.items)} skipped -> {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("prepare", __doc__, argv, {"out": "output folder (manifest.json + shards)"})
    prepare(cfg, Path(args.out))


if __name__ == "__main__":
    run(main)
