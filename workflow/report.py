"""Stage `report_files`: what `snakemake --report` shows besides the sample grids.

`training.png` (loss and learning rate per logged step, from log.jsonl), `metrics.html` (the
sample stage's metrics and the training summary as a table) and `config.yaml` (the full config).

    python -m workflow.report --config config.yaml --run-dir results/runs/digits-tiny \
        --out results/runs/digits-tiny/report
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

from .cli import run, stage_main
from .config import Config
from .fsutil import atomic_dir, read_json

TRAIN_SUMMARY = ("final_step", "final_loss", "mode", "precision", "zero_stage", "world_size", "global_batch",
                 "prediction_type", "bad_steps", "overflow_skipped_steps", "resumed_from")


def plot_training(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    loss_ax.plot(steps, [r["loss"] for r in records], color="tab:blue")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def flatten(node, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, node)]


def metrics_table(metrics: dict, train: dict) -> str:
    rows = flatten({"sample": metrics, "train": {k: train.get(k) for k in TRAIN_SUMMARY}})
    cells = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><style>td{padding:2px 10px;font-family:monospace}"
            "</style></head><body><table>\n" + cells + "\n</table></body></html>\n")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def make_report_files(cfg: Config, run_dir: Path, out: Path) -> None:
    train = read_json(run_dir / "train.json", "training result")
    metrics = read_json(run_dir / "samples" / "metrics.json", "sample metrics")
    with atomic_dir(out) as tmp:
        plot_training(run_dir / "log.jsonl", tmp / "training.png")
        (tmp / "metrics.html").write_text(metrics_table(metrics, train))
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print(f"report: training curves, metrics and config -> {out}")


def main(argv: list[str] | None = None) -> None:
    args, cfg = stage_main("report", __doc__, argv, {"run_dir": "run folder", "out": "output folder"})
    make_report_files(cfg, Path(args.run_dir), Path(args.out))


if __name__ == "__main__":
    run(main)
