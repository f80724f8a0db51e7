"""Run metrics: JSONL (every record), CSV (one row per record), and TensorBoard when installed."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import sys
import threading
from collections.abc import Iterator
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

                _quiet_tensorboard_thread()
                with self._naming(run_dir / "tensorboard"):
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
            with self._naming(Path(self.writer.log_dir)):
                for key, value in values.items():
                    if isinstance(value, (int, float)):
                        self.writer.add_scalar(f"{split}/{key}", value, step)

    @staticmethod
    @contextlib.contextmanager
    def _naming(folder: Path) -> Iterator[None]:
        """TensorBoard's write errors (from its writer thread) name no file: name its folder."""
        try:
            yield
        except OSError as e:
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, str(folder)) from None

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.csv_file.close()
        if self.writer is not None:
            self.writer.close()


def _quiet_tensorboard_thread() -> None:
    """Leave out the traceback TensorBoard's writer thread prints when the disk is full. The thread hands
    the same error to the main thread's next TensorBoard call, which the trainer reports as a full disk
    (exit 1, with a message); every other exception of every thread is printed as before."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        full = isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


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


def add_to_window(window: dict[str, Any], stats: dict[str, float]) -> None:
    """Add one step's metrics to the running sums of a log window (``{"steps": n, "sums": {metric: sum}}``):
    the same additions in the same order as ``sum(...)`` over the window's steps, so a row is bit-identical
    whether or not a resume split its window (trainers carry the window in their checkpoints)."""
    sums = window.setdefault("sums", {})
    for k, v in stats.items():
        sums[k] = sums.get(k, 0) + v
    window["steps"] = window.get("steps", 0) + 1


def window_row(window: dict[str, Any]) -> dict[str, float]:
    """The log row of a window: each metric's mean over the window's steps."""
    return {k: v / window["steps"] for k, v in window["sums"].items()}


def is_window(window: Any, step: int) -> bool:
    """Whether ``window``, read from a checkpoint of ``step``, is a log window: at most ``step`` steps and
    finite sums, or empty."""
    if window == {}:
        return True
    if not isinstance(window, dict) or set(window) != {"steps", "sums"}:
        return False
    steps, sums = window["steps"], window["sums"]
    return (type(steps) is int and 1 <= steps <= step and isinstance(sums, dict)
            and all(isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) for k, v in sums.items()))


__all__ = ["MetricsLog", "add_to_window", "is_window", "mean_ci", "read_jsonl", "window_row"]
