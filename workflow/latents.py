"""Reading cached latents for training: a deterministic, resumable stream of global batches.

The order of samples is a pure function of (seed, epoch): shards are permuted per epoch and samples
permuted within each shard. Optimizer step k consumes global samples [k*G, (k+1)*G) with
G = micro_batch * world_size * grad_accum, and rank r takes its own micro-batch slice of each. So
the data a step sees depends only on the step number - resuming needs no saved iterator state, and
a 1-rank run with the same global batch sees the same samples as an N-rank run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .fsutil import read_json
from .shards import iter_shard, npy_load


class LatentStream:
    def __init__(self, latent_dir: Path, seed: int):
        self.dir = Path(latent_dir)
        self.manifest = read_json(self.dir / "manifest.json", "latent cache manifest")
        self.shards = self.manifest["shards"]
        self.count = int(self.manifest["count"])
        if self.count == 0:
            raise ValueError(f"latent cache {self.dir} holds no samples")
        self.seed = seed
        self.null_text = torch.from_numpy(np.load(self.dir / "null_text.npy")).float()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def _shard_samples(self, shard_index: int, epoch: int) -> list[dict]:
        shard = self.shards[shard_index]
        path = self.dir / shard["name"]
        samples = list(iter_shard(path))
        if len(samples) != shard["count"]:
            raise ValueError(f"latent shard {path} holds {len(samples)} samples, manifest says {shard['count']}")
        order = np.random.default_rng([self.seed, epoch, shard_index]).permutation(len(samples))
        return [samples[i] for i in order]

    def samples_from(self, position: int) -> Iterator[dict]:
        """Decoded samples of the global stream starting at global sample `position`."""
        epoch, offset = divmod(position, self.count)
        while True:
            for shard_index in self._epoch_order(epoch):
                n = self.shards[shard_index]["count"]
                if offset >= n:  # skipped without reading
                    offset -= n
                    continue
                for raw in self._shard_samples(shard_index, epoch)[offset:]:
                    yield decode_latent_sample(raw)
                offset = 0
            epoch += 1

    def batches(self, start_step: int, micro_batch: int, world_size: int, rank: int, grad_accum: int) -> Iterator[dict]:
        """This rank's micro-batches, from optimizer step `start_step` on."""
        per_micro = micro_batch * world_size
        stream = self.samples_from(start_step * per_micro * grad_accum)
        while True:
            group = [next(stream) for _ in range(per_micro)]
            yield collate(group[rank * micro_batch : (rank + 1) * micro_batch])


def decode_latent_sample(raw: dict) -> dict:
    return {
        "mean": torch.from_numpy(npy_load(raw["mean.npy"])),
        "std": torch.from_numpy(npy_load(raw["std.npy"])),
        "text": torch.from_numpy(npy_load(raw["text.npy"])),
        "meta": json.loads(raw["json"]),
    }


def collate(samples: list[dict]) -> dict:
    return {  # mean/std: (batch, variants, C, H, W); variant 1, if cached, is the flipped image
        "mean": torch.stack([s["mean"] for s in samples]).float(),
        "std": torch.stack([s["std"] for s in samples]).float(),
        "texts": [s["text"].float() for s in samples],  # (captions, tokens, dim) each
    }
