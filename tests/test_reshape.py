"""Continuing a run on another number of ranks: the data stream finishes the epoch it stood in with
exactly the samples no old rank reached, and a ZeRO checkpoint written by 2 ranks resumes on 1 (and
back on 2) with its weights, Adam moments and EMA as they were saved."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import LORA_RUN, SHARED_RUN, train

from workflow.latents import LatentStream


def epoch_samples(stream: LatentStream, epoch: int) -> set:
    return {(int(s), i) for s in stream._epoch_order(epoch) for i in stream._order_in_shard(int(s), epoch)}


def taken(stream: LatentStream, epoch: int, start: int = 0, end: int | None = None) -> list:
    """The samples of `epoch` a rank is given between two offsets of it (micro-batches with buckets)."""
    if stream.bucketed:
        return [sample for batch in stream.plan(epoch)[0][start:end] for sample in batch]
    return stream._rank_block(epoch, stream.rank)[start:end]


@pytest.mark.parametrize("cache, old, new", [("built", 2, 1), ("built", 1, 2), ("bucketed", 2, 1), ("bucketed", 2, 3)])
def test_stream_finishes_the_epoch_on_another_number_of_ranks(cache, old, new, request):
    """Bugs caught: a continued epoch that shows a sample twice (each new rank restarting its block)
    or skips the rest of it (jumping to the next epoch), ranks sharing a sample, positions that do not
    resume the continued stream itself exactly, and the epochs after it not being the new geometry's."""
    latents, mb = request.getfixturevalue(cache)["latents"], 8

    def stream(world: int, rank: int, origin: dict | None = None) -> LatentStream:
        return LatentStream(latents, 0, world, rank, 64, micro_batch=mb, origin=origin)

    before = [stream(old, r) for r in range(old)]
    stop = 3 * before[0].per_rank // (2 * mb) if not before[0].bucketed else len(before[0].plan(1)[0]) // 2
    position = (before[0]._epoch_start(1) if before[0].bucketed else before[0].per_rank) + stop  # mid-epoch 1
    epoch, offset = before[0].epoch_and_offset(position)
    assert epoch == 1 and offset == stop
    seen = [sample for s in before for sample in taken(s, 1, 0, offset)]
    origin = {"world_size": old, "micro_batch": mb, "position": position, "origin": None}
    after = [stream(new, r, origin) for r in range(new)]
    rest = [sample for s in after for sample in taken(s, 1)]
    assert len(set(seen)) == len(seen) and len(set(rest)) == len(rest) and not set(seen) & set(rest)
    sitting_out = epoch_samples(before[0], 1) - set(seen) - set(rest)
    left_out = sum(s.left_out(1) for s in after) + len(after[0]._pool) % new  # in no block, or no full batch
    assert len(sitting_out) == left_out < new * mb * max(1, len(after[0].manifest.get("buckets") or []))
    # Positions count from the origin: epoch 1's rest, then epoch 2 as a fresh new-geometry stream has it.
    length = after[0]._epoch_length(1)
    assert after[0].epoch_and_offset(0) == (1, 0) and after[0].epoch_and_offset(length) == (2, 0)
    assert taken(after[0], 2) == taken(stream(new, 0), 2)
    assert after[0].origin_key and after[0].origin_key != stream(new, 0, origin | {"position": position + 1}).origin_key
    # The continued stream itself resumes exactly from any of its positions, past the epoch's end too.
    batches = after[0].batches(0, mb)
    straight = [next(batches) for _ in range(length + 2)]
    resumed = after[0].batches(straight[length - 2]["position"], mb)
    for a in straight[length - 1:]:
        b = next(resumed)
        assert a["position"] == b["position"] and a["mean"].equal(b["mean"])
    # A stream moved twice (old -> new -> old) still never repeats a sample of the epoch.
    if length > 1:
        twice = {"world_size": new, "micro_batch": mb, "position": 1, "origin": origin}
        back = [stream(old, r, twice) for r in range(old)]
        again = [sample for s in back for sample in taken(s, 1)]
        first = [sample for s in after for sample in taken(s, 1, 0, 1)]
        assert not set(again) & (set(seen) | set(first)) and len(set(again)) == len(again)


def digest(run) -> dict:
    return json.loads((run / "train.json").read_text())["digest"]


def assert_digests_match(a: dict, b: dict, what: str) -> None:
    """Checksums of the full tensors, summed over each run's fragments: equal up to float64 rounding."""
    assert set(a) == set(b) == {"raw", "ema", "exp_avg", "exp_avg_sq"}, (set(a), set(b))
    for kind in a:
        assert set(a[kind]) == set(b[kind]), kind
        for name, x in a[kind].items():
            y = b[kind][name]
            assert all(abs(p - q) <= 1e-9 * max(1.0, abs(p)) for p, q in zip(x, y)), f"{what}: {kind} {name}: {x} != {y}"


# ZeRO-2 (the LoRA and multi-GPU default) in make test; the other stages and LoRA in make test-geometry (time).
@pytest.mark.parametrize("case", [pytest.param("zero0", marks=pytest.mark.geometry),
                                  pytest.param("zero1", marks=pytest.mark.geometry), "zero2",
                                  pytest.param("zero3", marks=pytest.mark.geometry),
                                  pytest.param("lora-zero2", marks=pytest.mark.geometry)])
def test_checkpoint_continues_on_one_rank_and_back_on_two(zero_runs, built, tmp_path, case, request):
    """2 ranks -> 1 -> 2 with the global batch kept (train.grad_accum 1 -> 2 -> 1). Bugs caught: the
    refusal ("ranks: 2 -> 1") users met before; ZeRO shards loaded into the wrong partition (weights or
    Adam moments of the reloaded engine differ from the saved ones: DeepSpeed's universal checkpoint
    is what re-partitions them); an EMA shard loaded by position instead of by parameter; LoRA's
    checkpoint (trainable parameters only) not converting; a changed global batch accepted silently."""
    run = tmp_path / "run"
    if case == "lora-zero2":
        shutil.copytree(request.getfixturevalue("lora_run"), run)
        shared, zero = LORA_RUN, 2
    else:
        zero = int(case[-1])
        shutil.copytree(zero_runs[zero], run)
        shared = [*SHARED_RUN, f"train.zero_stage={zero}"]
    last = int((run / "checkpoints" / "latest").read_text().strip()[4:])
    tag, written = run / "checkpoints" / f"step{last:08d}", digest(run)  # the run ended at that checkpoint
    refused = train(built, run, *shared, "train.procs=1", check=False)
    assert refused.returncode == 2 and "global batch 16 -> 8" in refused.stderr and "train.grad_accum=2" in refused.stderr
    # Resumed on 1 rank with nothing left to train: the engine holds what the 2 ranks saved.
    proc = train(built, run, *shared, f"train.steps={last}", "train.procs=1", "train.grad_accum=2")
    assert f"resumed from step {last} (written by 2 ranks, continued on 1)" in proc.stdout, proc.stdout[-2000:]
    assert_digests_match(written, digest(run), "2 ranks -> 1")
    assert (tag / "universal").is_dir() == (zero > 0)
    # Training goes on from there on 1 rank, and that checkpoint goes back to 2 ranks.
    train(built, run, *shared, "train.procs=1", "train.grad_accum=2", f"train.steps={last + 2}")
    one_rank = json.loads((run / "train.json").read_text())
    assert one_rank["resumed_from"] == last and one_rank["final_step"] == last + 2 and one_rank["world_size"] == 1
    proc = train(built, run, *shared, f"train.steps={last + 2}")
    assert f"resumed from step {last + 2} (written by 1 ranks, continued on 2)" in proc.stdout, proc.stdout[-2000:]
    assert_digests_match(one_rank["digest"], digest(run), "1 rank -> 2")
