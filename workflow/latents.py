"""Reading cached latents for training: each rank's disjoint, deterministic, resumable stream.

Every epoch has one global order of the N cached samples (less `train.val_samples` held out for
the validation loss), a pure function of (seed, epoch): shards
permuted, then samples permuted within each shard. Rank r of W takes the contiguous block
[r*N//W, (r+1)*N//W) of that order (the N mod W left-over samples sit out that epoch; the next
epoch's order differs), so ranks never share a sample within an epoch, each reads only about 1/W
of the shards, and all ranks have epochs of the same length: none runs dry before another, whether
or not W divides the shard count. A rank's position in its stream is a sample count, so a
checkpoint resumes it exactly: no iterator state.

With aspect-ratio buckets (a cache with more than one bucket), every micro-batch comes from one
bucket and holds exactly `micro_batch` samples: a rank walks its block of the epoch order and puts
each sample into its bucket's open batch, which leaves when full. What is left in the open
batches at the end of the epoch (fewer than `micro_batch` per bucket and rank) sits out that
epoch and is counted (`left_out`); the next epoch's order differs, so other samples sit out. The
plan of an epoch is computed from the manifest alone (each shard's `bucket_of`), so the position is
a count of micro-batches and resuming is exact as without buckets.

A run resumed on another number of ranks (`origin`: the geometry and position it continues from)
finishes the epoch it stood in with what that epoch has not shown yet: the samples no rank of the
earlier geometry reached, in the epoch's order, split into contiguous blocks among the new ranks as
above; positions count from there (0 = where the earlier geometry stopped), and the epochs after it
are the ordinary ones of the new geometry. An origin may itself have an origin (a run moved twice).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .fsutil import read_json
from .shards import npy_load, shard_samples


# The held-out validation samples are drawn with a fixed seed, not train.seed, so that runs with
# different seeds are validated on the same samples.
VALIDATION_SEED = 20240


AUTO_VAL_MIN_SAMPLES, AUTO_VAL_SHARE, AUTO_VAL_MAX = 100, 0.05, 64


def resolve_val_samples(val_samples: int | str, count: int) -> int:
    """train.val_samples for a cache of `count` samples. auto: none below 100 samples (a handful of
    images is too few to spare any: the validation loss is then skipped, saying why), else 5 % of
    them up to 64, so the hold-out never takes more than a small share."""
    if val_samples == "auto":
        return 0 if count < AUTO_VAL_MIN_SAMPLES else min(AUTO_VAL_MAX, int(count * AUTO_VAL_SHARE))
    if val_samples >= count:
        raise ValueError(f"train.val_samples ({val_samples}) must be smaller than the {count} cached samples "
                         f"(train.val_samples=auto holds out none below {AUTO_VAL_MIN_SAMPLES})")
    return int(val_samples)


def held_out(manifest: dict, val_samples: int | str) -> list[set[int]]:
    """Per shard, the in-shard indices of the `val_samples` samples kept out of training."""
    counts = [int(s["count"]) for s in manifest["shards"]]
    val_samples = resolve_val_samples(val_samples, sum(counts))
    chosen = np.random.default_rng(VALIDATION_SEED).permutation(sum(counts))[:val_samples]
    starts = np.cumsum([0] + counts[:-1])
    out: list[set[int]] = [set() for _ in counts]
    for g in chosen:
        shard = int(np.searchsorted(starts, g, side="right") - 1)
        out[shard].add(int(g - starts[shard]))
    return out


def validation_samples(latent_dir: Path, val_samples: int | str) -> list[dict]:
    """The held-out samples (decoded), in a fixed order."""
    manifest = read_json(Path(latent_dir) / "manifest.json", "latent cache manifest")
    out = []
    for shard, keep in zip(manifest["shards"], held_out(manifest, val_samples)):
        if keep:  # checked like the training stream's reads: a corrupt shard is an error naming it
            out += [decode_latent_sample(raw) for i, raw in enumerate(read_verified_shard(Path(latent_dir), shard))
                    if i in keep]
    return out


class CorruptShard(ValueError):
    """A latent shard that is missing, truncated or not what the cache wrote (sha256)."""


def read_verified_shard(latent_dir: Path, shard: dict) -> list[dict]:
    """A latent shard's raw samples, read once and checked against its manifest entry (sha256, count)."""
    path = latent_dir / shard["name"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptShard(f"latent shard {path} is unreadable: {e}") from None
    if "sha256" in shard and hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise CorruptShard(f"latent shard {path} is corrupt: its sha256 differs from the cache manifest's")
    try:
        samples = shard_samples(data, str(path))
    except ValueError as e:
        raise CorruptShard(f"latent shard {path} is unreadable: {e}") from None
    if len(samples) != shard["count"]:
        raise CorruptShard(f"latent shard {path} holds {len(samples)} samples, the manifest says {shard['count']}")
    return samples


class LatentStream:
    def __init__(self, latent_dir: Path, seed: int, world_size: int = 1, rank: int = 0, val_samples: int | str = 0,
                 skip_corrupt: bool = False, micro_batch: int = 1, origin: dict | None = None):
        self.dir = Path(latent_dir)
        self.manifest = read_json(self.dir / "manifest.json", "latent cache manifest")
        self.shards = self.manifest["shards"]
        self.held_out = held_out(self.manifest, val_samples)
        self.counts = [int(s["count"]) - len(h) for s, h in zip(self.shards, self.held_out)]  # trainable
        self.count = sum(self.counts)
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.skip_corrupt = skip_corrupt
        self.corrupt: dict[str, str] = {}  # shard name -> what is wrong, for the shards skipped
        self.per_rank = self.count // world_size  # samples per rank per epoch
        if self.per_rank == 0:
            raise ValueError(f"latent cache {self.dir} holds {self.count} samples: fewer than the {world_size} ranks")
        self.null_text = torch.from_numpy(np.load(self.dir / "null_text.npy")).float()
        pooled = self.dir / "null_pooled.npy"
        self.null_pooled = torch.from_numpy(np.load(pooled)).float() if pooled.is_file() else None
        self._loaded: tuple[tuple[int, int], list[dict]] | None = None
        self.micro_batch = micro_batch
        self.shapes = max(1, len(self.manifest.get("buckets") or []))  # latent shapes training meets
        self.bucketed = self.shapes > 1
        self._plans: dict[int, tuple[list[list[tuple[int, int]]], int]] = {}  # the last few epochs'
        self._epoch_ends: list[int] = []  # cumulative positions at the end of each epoch from first_epoch
        self._raw: OrderedDict[int, list[dict] | None] = OrderedDict()  # a few shards' raw samples
        self.origin, self.first_epoch, self._pool = origin, 0, None
        if origin:
            before = LatentStream(latent_dir, seed, origin["world_size"], 0, val_samples, skip_corrupt,
                                  origin["micro_batch"], origin.get("origin"))
            self.first_epoch = before.epoch_and_offset(origin["position"])[0]
            self._pool = before.unseen(origin["position"])

    @property
    def origin_key(self) -> tuple[int, ...]:
        """Numbers that tell this stream's origin apart (empty without one), for seeding per position."""
        if not self.origin:
            return ()
        digest = hashlib.sha256(json.dumps(self.origin, sort_keys=True).encode()).digest()
        return tuple(int(x) for x in np.frombuffer(digest[:8], np.uint32))

    def epoch_and_offset(self, position: int) -> tuple[int, int]:
        """(epoch, offset in it) of a stream position: samples, or with buckets micro-batches."""
        if not self.bucketed and self.origin is None:
            return divmod(position, self.per_rank)
        while not self._epoch_ends or self._epoch_ends[-1] <= position:
            self._end_next_epoch()
        i = bisect.bisect_right(self._epoch_ends, position)
        return self.first_epoch + i, position - (self._epoch_ends[i - 1] if i else 0)

    def _end_next_epoch(self) -> None:
        """Plan one more epoch (each is planned once) and note the position where it ends."""
        epoch = self.first_epoch + len(self._epoch_ends)
        self._epoch_ends.append((self._epoch_ends[-1] if self._epoch_ends else 0) + self._epoch_length(epoch))

    def _epoch_start(self, epoch: int) -> int:
        """The stream position at the start of `epoch`."""
        if not self.bucketed and self.origin is None:
            return epoch * self.per_rank
        i = epoch - self.first_epoch
        while len(self._epoch_ends) < i:
            self._end_next_epoch()
        return self._epoch_ends[i - 1] if i > 0 else 0

    def _epoch_length(self, epoch: int) -> int:
        if self.bucketed:
            return len(self.plan(epoch)[0])
        return len(self._rank_block(epoch, self.rank)) if self._is_handover(epoch) else self.per_rank

    def epochs_done(self, position: int) -> float:
        """How many epochs of this rank's stream `position` covers, with the fraction of the current
        one. A data set smaller than a micro-batch goes through several epochs per micro-batch."""
        epoch, offset = self.epoch_and_offset(position)
        return epoch + offset / max(1, self._epoch_length(epoch))

    # ------------------------------------------------------------ blocks, plans, handover

    def _is_handover(self, epoch: int) -> bool:
        return self._pool is not None and epoch == self.first_epoch

    def _rank_block(self, epoch: int, rank: int) -> list[tuple[int, int]]:
        """(shard index, stored index) of rank `rank`'s samples of `epoch`, in the epoch's order."""
        if self._is_handover(epoch):
            n = len(self._pool) // self.world_size
            return self._pool[rank * n : (rank + 1) * n]
        out: list[tuple[int, int]] = []
        for shard_index, lo, hi in self._block_ranges(epoch, 0, rank):
            order = self._order_in_shard(shard_index, epoch)
            out += [(shard_index, order[k]) for k in range(lo, hi)]
        return out

    def _plan_of(self, block: list[tuple[int, int]]) -> tuple[list[list[tuple[int, int]]], dict[int, list]]:
        """A block's micro-batches (one bucket each, exactly micro_batch long) and the open batches left."""
        open_batches: dict[int, list[tuple[int, int]]] = {}
        batches = []
        for shard_index, i in block:
            bucket = self.shards[shard_index]["bucket_of"][i]
            batch = open_batches.setdefault(bucket, [])
            batch.append((shard_index, i))
            if len(batch) == self.micro_batch:
                batches.append(open_batches.pop(bucket))
        return batches, open_batches

    def plan(self, epoch: int) -> tuple[list[list[tuple[int, int]]], int]:
        """This rank's micro-batches of `epoch` (each a list of (shard index, stored index), one
        bucket, exactly micro_batch long) and how many of its samples sit out the epoch."""
        if epoch not in self._plans:
            batches, open_batches = self._plan_of(self._rank_block(epoch, self.rank))
            if not batches and not self._is_handover(epoch):  # a handover's rest of an epoch may be short
                counts = {"x".join(map(str, self.manifest["buckets"][b]["size"])): len(v) for b, v in open_batches.items()}
                raise ValueError(f"no bucket gives rank {self.rank} a full micro-batch of {self.micro_batch} in epoch "
                                 f"{epoch} ({self.per_rank} samples per rank over buckets {counts}): lower "
                                 f"train.micro_batch or use fewer cache.buckets")
            self._plans = {epoch: (batches, sum(map(len, open_batches.values())))} | dict(list(self._plans.items())[-3:])
        return self._plans[epoch]

    def unseen(self, position: int) -> list[tuple[int, int]]:
        """The samples of the epoch that `position` stands in which no rank of this geometry has been
        given yet (all ranks stand at the same position: they step together), in the epoch's order:
        what a run continuing on another number of ranks shares out."""
        epoch, offset = self.epoch_and_offset(position)
        seen: set[tuple[int, int]] = set()
        for rank in range(self.world_size):
            block = self._rank_block(epoch, rank)
            if self.bucketed:
                seen.update(sample for batch in self._plan_of(block)[0][:offset] for sample in batch)
            else:
                seen.update(block[:offset])
        if self._is_handover(epoch):
            pool = self._pool
        else:
            pool = [(int(s), i) for s in self._epoch_order(epoch) for i in self._order_in_shard(int(s), epoch)]
        return [sample for sample in pool if sample not in seen]

    def left_out(self, epoch: int) -> int:
        return self.plan(epoch)[1] if self.bucketed else 0

    def _raw_samples(self, shard_index: int) -> list[dict] | None:
        """A shard's raw samples in stored order (the last few shards read are kept); None for a
        corrupt shard under skip_corrupt."""
        if shard_index not in self._raw:
            shard = self.shards[shard_index]
            try:
                self._raw[shard_index] = read_verified_shard(self.dir, shard)
            except CorruptShard as e:
                if not self.skip_corrupt:
                    raise
                self.corrupt[shard["name"]] = str(e)
                self._raw[shard_index] = None
            while len(self._raw) > 4:
                self._raw.popitem(last=False)
        self._raw.move_to_end(shard_index)
        return self._raw[shard_index]

    def _bucketed_batches(self, position: int) -> Iterator[tuple[int, list[dict]]]:
        """(position after it, decoded samples) of each micro-batch from batch `position` on; a batch
        with a sample of a skipped corrupt shard is passed over but counts in the position."""
        epoch, offset = self.epoch_and_offset(position)
        while True:
            for batch in self.plan(epoch)[0][offset:]:
                position += 1
                shards = [self._raw_samples(shard) for shard, _ in batch]
                if all(raw is not None for raw in shards):
                    yield position, [decode_latent_sample(raw[i]) for raw, (_, i) in zip(shards, batch)]
            epoch, offset = epoch + 1, 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def _order_in_shard(self, shard_index: int, epoch: int) -> list[int]:
        """The stored indices of a shard's trainable samples, in this epoch's order."""
        kept = [i for i in range(int(self.shards[shard_index]["count"])) if i not in self.held_out[shard_index]]
        return [kept[i] for i in np.random.default_rng([self.seed, epoch, shard_index]).permutation(len(kept))]

    def _shard_samples(self, shard_index: int, epoch: int) -> list[dict] | None:
        """One shard's raw samples in this epoch's order (the last shard read is kept); None for a
        corrupt shard under skip_corrupt."""
        if self._loaded is None or self._loaded[0] != (shard_index, epoch):
            shard = self.shards[shard_index]
            try:
                samples = read_verified_shard(self.dir, shard)
            except CorruptShard as e:
                if not self.skip_corrupt:
                    raise
                self.corrupt[shard["name"]] = str(e)
                self._loaded = ((shard_index, epoch), None)
                return None
            self._loaded = ((shard_index, epoch), [samples[i] for i in self._order_in_shard(shard_index, epoch)])
        return self._loaded[1]

    def _block_ranges(self, epoch: int, offset: int, rank: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(shard index, lo, hi): the in-shard positions [lo, hi) of each shard (in the epoch's order)
        that the block of `epoch` of `rank` (this rank by default) covers from its `offset`-th sample
        on; shards outside the block are not visited."""
        rank = self.rank if rank is None else rank
        start = rank * self.per_rank + offset
        end = (rank + 1) * self.per_rank
        shard_start = 0
        for shard_index in self._epoch_order(epoch):
            n = self.counts[shard_index]
            lo, hi = max(start, shard_start), min(end, shard_start + n)
            if lo < hi:
                yield int(shard_index), lo - shard_start, hi - shard_start
            shard_start += n
            if shard_start >= end:
                return

    def _epoch_block(self, epoch: int, offset: int) -> Iterator[tuple[int, dict | None]]:
        """(offset in block, raw sample) of this rank's samples of `epoch` from its `offset`-th on;
        a corrupt shard skipped under skip_corrupt yields None for each of its samples. Shards
        outside the block are not read."""
        if self._is_handover(epoch):
            for shard_index, i in self._rank_block(epoch, self.rank)[offset:]:
                raw = self._raw_samples(shard_index)
                yield offset, None if raw is None else raw[i]
                offset += 1
            return
        for shard_index, lo, hi in self._block_ranges(epoch, offset):
            samples = self._shard_samples(shard_index, epoch)
            for k in range(lo, hi):
                yield offset, None if samples is None else samples[k]
                offset += 1

    def samples_from(self, position: int) -> Iterator[dict]:
        """Decoded samples of this rank's stream from its `position`-th sample on (endless)."""
        for _, sample in self.positioned_samples(position):
            yield sample

    def positioned_samples(self, position: int) -> Iterator[tuple[int, dict]]:
        """(stream position after the sample, decoded sample). Samples of a skipped corrupt shard are
        passed over but still count in the position, so a resumed run reads what this one read."""
        epoch, offset = self.epoch_and_offset(position)
        while True:
            for k, raw in self._epoch_block(epoch, offset):
                if raw is not None:
                    yield self._epoch_start(epoch) + k + 1, decode_latent_sample(raw)
            epoch, offset = epoch + 1, 0

    def batches(self, position: int, micro_batch: int, pin: bool = False, prefetch: int = 4,
                prior: "PriorPart | None" = None) -> Iterator[dict]:
        """Micro-batches from sample `position` on, collated by a background thread that stays
        `prefetch` batches ahead (pinned for an asynchronous copy to the GPU when `pin`). Each batch
        carries `position`: where the stream stands after it. With `prior` (data.prior), each batch
        is `micro_batch` samples of this stream followed by `prior.count` of the prior stream,
        `loss_weight` per sample, and carries `prior_position` too."""
        def produce() -> Iterator[dict]:
            if self.bucketed:
                if micro_batch != self.micro_batch:
                    raise ValueError(f"this bucketed stream plans micro-batches of {self.micro_batch}, not {micro_batch}")
                for after, samples in self._bucketed_batches(position):
                    batch = collate(samples)
                    yield ({k: v.pin_memory() for k, v in batch.items()} if pin else batch) | {"position": after}
            stream = self.positioned_samples(position)
            prior_samples = prior.stream.positioned_samples(prior.position) if prior else None
            while True:
                taken = [next(stream) for _ in range(micro_batch)]
                extra = {"position": taken[-1][0]}
                samples = [s for _, s in taken]
                if prior:
                    from_prior = [next(prior_samples) for _ in range(prior.count)]
                    samples += [s for _, s in from_prior]
                    extra["prior_position"] = from_prior[-1][0]
                batch = collate(samples)
                if prior:
                    batch["loss_weight"] = torch.tensor([1.0] * micro_batch + [prior.loss_weight] * prior.count)
                batch = {k: v.pin_memory() for k, v in batch.items()} if pin else batch
                yield batch | extra

        return prefetched(produce(), prefetch)


class PriorPart(NamedTuple):
    """The prior (class) images' share of every micro-batch: their stream, where it stands, how many
    samples per micro-batch, and their loss weight."""
    stream: LatentStream
    position: int
    count: int
    loss_weight: float


def prefetched(source: Iterator, depth: int) -> Iterator:
    """Items of `source`, produced by a daemon thread up to `depth` ahead; its errors are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work() -> None:
        try:
            for item in source:
                q.put((True, item))
        except BaseException as e:  # handed to the consumer, which raises it with the shard's name
            q.put((False, e))

    threading.Thread(target=work, daemon=True, name="latent-prefetch").start()
    while True:
        ok, item = q.get()
        if not ok:
            raise item
        yield item


def decode_latent_sample(raw: dict) -> dict:
    sample = {name: torch.from_numpy(npy_load(raw[f"{name}.npy"])) for name in ("mean", "std", "text", "size")}
    if "pooled.npy" in raw:
        sample["pooled"] = torch.from_numpy(npy_load(raw["pooled.npy"]))
    return sample | {"meta": json.loads(raw["json"])}


def _pad_captions(per_sample: list[torch.Tensor], most: int) -> torch.Tensor:
    """(batch, most, ...): samples with fewer captions padded by repeating their first."""
    return torch.stack([torch.cat([t, t[:1].expand(most - t.shape[0], *t.shape[1:])]) for t in per_sample])


def collate(samples: list[dict]) -> dict:
    """mean/std: (batch, variants, C, H, W), variant 1 (if cached) the flipped image; size:
    (batch, variants, 6) SDXL's time_ids of each variant; texts: (batch, captions, tokens, dim) and
    for SDXL pooled: (batch, captions, dim), samples with fewer captions padded by repeating their
    first, and `n_texts` how many each really has."""
    most = max(s["text"].shape[0] for s in samples)
    batch = {
        "mean": torch.stack([s["mean"] for s in samples]),  # stored dtype (fp16): half the bytes to copy
        "std": torch.stack([s["std"] for s in samples]),
        "size": torch.stack([s["size"] for s in samples]),
        "texts": _pad_captions([s["text"] for s in samples], most),
        "n_texts": torch.tensor([s["text"].shape[0] for s in samples]),
    }
    if "pooled" in samples[0]:
        batch["pooled"] = _pad_captions([s["pooled"] for s in samples], most)
    return batch
