"""Stage `prepare`: a data source -> normalized raw shards + manifest.json.

Sources (`data.source`, see workflow/sources.py): builtin:digits, imagefolder:<dir>,
hf:<id or path>, wds:<tar pattern>. Each sample is stored as its original image bytes (`<ext>`)
plus `json` with `captions` (all of them) and source metadata. The manifest lists `count`, the
shards with their sha256, the `source`, and every `skipped` item with its reason. With
`data.prior.source`, the prior (class) images are prepared the same way into `prior/` (their
captions through `data.prior.caption`), and the manifest's `prior` holds that folder's manifest.

    python -m workflow.prepare --config config.yaml --out results/data/digits
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cli import run, stage_main
from .config import Config, DataConfig
from .fsutil import atomic_dir, write_json
from .shards import write_shards
from .sources import Skipper, iter_source


def prepare(cfg: Config, out_dir: Path) -> dict[str, Any]:
    with atomic_dir(out_dir) as tmp:
        manifest = write_prepared(cfg.data, tmp, "data.source")
        prior = cfg.data.prior
        if prior.source:
            as_data = cfg.data.model_copy(update={"source": prior.source, "caption": prior.caption, "name": None})
            (tmp / "prior").mkdir()
            manifest["prior"] = write_prepared(as_data, tmp / "prior", "data.prior.source")
            print(f"prepare: {manifest['prior']['count']} prior samples -> {out_dir / 'prior'}")
        write_json(tmp / "manifest.json", manifest)
    print(f"prepare: {manifest['count']} samples in {len(manifest['shards'])} shard(s), {len(manifest['skipped'])} "
          f"skipped -> {out_dir}")
    return manifest


def write_prepared(data: DataConfig, folder: Path, key: str) -> dict[str, Any]:
    """One source's shards into `folder`; its manifest (written there too)."""
    skip = Skipper(data.strict)
    shards = write_shards(iter_source(data, skip), folder, data.shard_size)
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise ValueError(f"{key} {data.source}: no usable images ({len(skip.items)} skipped, e.g. {skip.items[:3]})")
    manifest = {"source": data.source, "count": count, "shards": shards, "skipped": skip.items}
    write_json(folder / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("prepare", __doc__, argv, {"out": "output folder (manifest.json + shards)"})
    prepare(cfg, Path(args.out))


if __name__ == "__main__":
    run(main)
