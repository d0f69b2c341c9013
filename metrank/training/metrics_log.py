"""Per-epoch metrics log: JSONL (append) + CSV (rewritten atomically) + TensorBoard when installed, and a PNG plot."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metrank.atomic import atomic_write_bytes


class MetricsLog:
    """Collects one record per epoch (epoch 0 = the untrained heads) and writes them under ``out_dir``.

    Files: ``metrics.jsonl``, ``metrics.csv``, ``curves.png`` (loss and Recall@K per epoch) and TensorBoard
    scalars in ``tb/`` when ``tensorboard`` is importable. On resume, records of epochs at or after the resumed
    epoch are dropped so the log matches the training state.
    """

    def __init__(
        self, out_dir: Path, *, resume_epoch: int | None = None, tensorboard: bool = True, plot: bool = True
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if resume_epoch is not None and self.jsonl.is_file():
            self.records = [
                r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["epoch"] < resume_epoch
            ]
        self._write_jsonl()
        self.plot_enabled = plot
        self.writer = None
        if tensorboard:
            writer_cls: Any
            try:
                from torch.utils.tensorboard import SummaryWriter as writer_cls
            except ImportError:  # tensorboard is optional
                writer_cls = None
            if writer_cls is not None:
                self.writer = writer_cls(str(self.out_dir / "tb"))

    def _write_jsonl(self) -> None:
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv()
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()
        if self.plot_enabled:
            plot_curves(self.records, self.out_dir / "curves.png")

    def _write_csv(self) -> None:
        columns: list[str] = []
        for record in self.records:
            columns += [k for k in record if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_bytes(self.out_dir / "metrics.csv", buf.getvalue().encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def recall_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The Recall@K columns present in ``records`` (``R@1``, ``t2i_R@5``, ...) in first-seen order."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if "R@" in k and k not in keys and not k.startswith("MAP")]
    return keys


def plot_curves(records: Sequence[dict[str, Any]], path: Path, title: str | None = None) -> None:
    """Two panels: training loss per epoch, and every Recall@K column per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
    trained = [r for r in records if r.get("loss") is not None]
    ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    for key in recall_keys(records):
        points = [(r["epoch"], r[key]) for r in records if key in r]
        ax_recall.plot(*zip(*points), marker=".", label=key)
    ax_recall.set_xlabel("epoch")
    ax_recall.set_ylabel("Recall@K (held-out)")
    if recall_keys(records):
        ax_recall.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
