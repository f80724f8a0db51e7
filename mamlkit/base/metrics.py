"""Run metrics: JSONL (every record), CSV (one row per record), and TensorBoard when installed."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from mamlkit.base.errors import UserError

CSV_COLUMNS = ["step", "split", "loss", "acc", "tasks_per_s", "elapsed_s"]


def mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval, 1.96·σ/√n (σ with ddof=1)."""
    values = values.double().flatten()
    n = values.numel()
    mean = values.mean().item()
    if n < 2:
        return mean, math.nan
    return mean, 1.96 * values.std(unbiased=True).item() / math.sqrt(n)


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard) in ``run_dir``."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        new = not (run_dir / "metrics.csv").exists()
        self.csv_file = open(run_dir / "metrics.csv", "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, CSV_COLUMNS, extrasaction="ignore")
        if new:
            self.csv.writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # the optional extra `tensorboard` is not installed
                self.writer = None
                _note_no_tensorboard()

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.csv.writerow(record)
        self.csv_file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.csv_file.close()
        if self.writer is not None:
            self.writer.close()


_NOTED: list[bool] = []


def _note_no_tensorboard() -> None:
    """Say once per process that TensorBoard logs are skipped, and how to get them.

    tensorboard stays an extra, not a dependency: it brings grpcio, protobuf and a web server for logs
    that metrics.jsonl and metrics.csv already hold in full."""
    if not _NOTED:
        _NOTED.append(True)
        print("mamlkit: note: no TensorBoard logs: the tensorboard package is not installed "
              "(`pip install tensorboard` adds them; --no-tensorboard silences this). metrics.jsonl and "
              "metrics.csv hold every record.", file=sys.stderr)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log. A torn last line (the write cut short by a kill or a full disk) is
    dropped; a bad line before it is a :class:`UserError` naming the line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the torn tail of an interrupted append
            raise UserError(f"{path} line {n} is not a JSON record: the log is damaged. Remove that line, or "
                            "start a new run") from None
    return records


__all__ = ["MetricsLog", "mean_ci", "read_jsonl"]
