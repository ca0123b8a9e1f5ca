"""Webdataset shard I/O shared by prepare (raw images), cache (latents) and train (reads latents).

A shard is a plain tar that webdataset reads (`key.ext` members grouped by key). Each shard is
written under a temporary name and renamed when closed; the manifest lists every shard with its
sample count and sha256, so a reader can tell a finished shard from a leftover.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds

from .fsutil import sha256_file, tmp_name


WRITE_BUFFER = 8 << 20


class AtomicTar:
    """One tar shard, written under a temporary name and renamed into place by `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        # A large buffer: tarfile writes in small pieces; on a network filesystem each unbuffered
        # write is a round trip. Fixed mtime: the same content gives the same bytes.
        self.file = open(self.tmp, "wb", buffering=WRITE_BUFFER)
        self.tar = wds.TarWriter(self.file, mtime=0)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        self.tar.write(sample)
        self.count += 1

    def close(self) -> dict[str, Any]:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return shard_info(self.path, self.count)

    def abort(self) -> None:
        self.tar.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicTar":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.info = self.close()
        else:
            self.abort()


class ShardWriter:
    """Writes samples into `<prefix>-NNNNNN.tar` files of at most `shard_size` samples each."""

    def __init__(self, out_dir: str | Path, prefix: str = "shard", shard_size: int = 1000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size = prefix, shard_size
        self.shards: list[dict[str, Any]] = []
        self._current: AtomicTar | None = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._current is None:
            self._current = AtomicTar(self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar")
        self._current.write(sample)
        if self._current.count >= self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._current is not None:
            self.shards.append(self._current.close())
            self._current = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self._close_shard()
        elif self._current is not None:
            self._current.abort()


def shard_info(path: Path, count: int) -> dict[str, Any]:
    return {"name": path.name, "count": count, "sha256": sha256_file(path)}


def write_shards(samples: Iterable[dict[str, Any]], out_dir: Path, shard_size: int, prefix: str = "shard") -> list[dict]:
    with ShardWriter(out_dir, prefix, shard_size) as w:
        for s in samples:
            w.write(s)
    return w.shards


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__` plus bytes per extension) of one shard, in stored order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    with open(path, "rb") as f:
        yield from _grouped_samples(f, str(path))


def shard_samples(data: bytes, name: str) -> list[dict[str, Any]]:
    """Raw samples of a shard already read into memory, so a reader that also hashes the bytes
    reads the file once."""
    return list(_grouped_samples(io.BytesIO(data), name))


def _grouped_samples(stream, name: str) -> Iterator[dict[str, Any]]:
    """webdataset's grouping of tar members into samples (`key.ext` members share a key)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        yield from group_by_keys(tar_file_expander([{"stream": stream, "url": name}]))
    except Exception as e:  # a truncated or corrupt tar: say which shard
        raise ValueError(f"shard {name} is unreadable: {e}") from e


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
