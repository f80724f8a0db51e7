"""Tasks from a CSV file: every distinct value of a task column is a task (a patient, an asset, a site).

``mamlkit train csv --path data.csv --task-column patient_id --target y [--features a b ...]
[--kind regression|classification]``

Procedure (all of it fixed and documented, so a run is reproducible from its config alone):

1. Read the CSV (header row first; ``,`` separated, quotes as Python's :mod:`csv`). Missing values
   are empty cells and ``NA``, ``N/A``, ``NaN``, ``nan``, ``null``, ``None``.
2. Columns: ``--task-column`` and ``--target`` must exist; ``--features`` default to every other
   column. A wrong name is a :class:`~mamlkit.base.errors.UserError` that lists the file's columns.
3. Split by task, never by row: every task value gets the key
   ``blake2b("mamlkit-csv-split/1/" + value)`` (8 bytes, little-endian); tasks sorted by key,
   the first ``round(f_train·n)`` are ``train``, the next ``round(f_val·n)`` ``val``, the rest
   ``test`` (``--task-split``, default 0.7 0.15 0.15). The split depends on the task values alone.
4. Missing values (``--fill``): ``none`` (default) is an error naming the rows (file line numbers)
   and columns; ``drop`` drops those rows; ``mean`` fills numeric features with their meta-train
   mean and leaves a categorical feature's one-hot all zero (missing targets or task ids are still
   an error under ``mean``: use ``drop``).
5. Feature columns whose every value parses as a number are numeric; the others are categorical and
   one-hot encoded over the categories seen in meta-train rows (sorted), at most
   ``--max-categories`` of them, else an error naming the column. A category unseen in meta-train
   is all zeros.
6. Standardisation: mean and standard deviation of every encoded feature over the meta-train rows
   only (a constant column gets std 1), and for regression of the target too. The statistics live
   in the model (``Standardize`` buffers and the model spec), hence in every checkpoint.
7. Tasks with fewer than ``k_shot + k_query`` rows cannot give an episode: ``--small-tasks skip``
   (default) drops them and reports the count per split; ``error`` refuses them.

Reading and encoding (steps 1, 2 and 4 to 6) are :mod:`mamlkit.data.tables`, the one table encoding,
which ``mamlkit adapt`` applies to a new task's rows too; this module adds the split and the episodes.

Episodes: a task of the split drawn uniformly, then ``k_shot`` support and ``k_query`` query rows
drawn without replacement within that task (support and query never share a row). For
classification the counts are rows per task, not per class (CSV tasks need not hold every class),
and the classes are the sorted distinct target values of the whole file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.data import tables
from mamlkit.tasks.family import Baseline, Column, Report

log = logging.getLogger("mamlkit")

SPLIT_SEED = 1
GROUP_BLOCK = 1 << 16  # rows per step when rows are grouped by task


def _split_key(value: str) -> int:
    digest = hashlib.blake2b(f"mamlkit-csv-split/{SPLIT_SEED}/{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_tasks(values: list[str], fractions: tuple[float, ...]) -> dict[str, list[str]]:
    """Task values ``{"train", "val", "test"} -> list`` by the hash order of the module docstring."""
    order = sorted(values, key=_split_key)
    n = len(order)
    a = round(fractions[0] * n)
    b = a + round(fractions[1] * n)
    parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    empty = [k for k, v in parts.items() if not v]
    if empty:
        raise UserError(f"the CSV has {n} task(s); the task split {tuple(fractions)} leaves no task for "
                        f"{', '.join(empty)}. Each split needs at least one task: use a file with more "
                        "distinct task-column values or change --task-split.")
    return parts



@dataclass(frozen=True, eq=False)
class TabularData:
    """A CSV encoded for meta-learning.

    ``x [R, F]`` float64 encoded features (not standardised), ``y [R]`` float64 (regression) or int64
    class ids, ``task [R]`` index into ``tasks``. ``splits`` maps train/val/test to the task indices
    kept (enough rows); ``skipped`` counts the small tasks dropped per split; ``dropped_rows`` the rows
    removed by ``--fill drop``. ``mean``/``std`` (``[F]``) and ``target_mean``/``target_std`` are
    fitted on meta-train rows only.
    """

    x: Tensor
    y: Tensor
    task: Tensor
    tasks: tuple[str, ...]
    feature_names: tuple[str, ...]
    categories: dict[str, list[str]]
    classes: tuple[str, ...]
    kind: str
    splits: dict[str, list[int]]
    split_values: dict[str, list[str]]
    skipped: dict[str, int]
    dropped_rows: int
    mean: Tensor
    std: Tensor
    target_mean: float
    target_std: float
    columns: tuple[str, ...] = field(default=())

    @property
    def num_features(self) -> int:
        return self.x.shape[1]

    spec: tables.TableSpec | None = None

    def preprocess(self) -> dict:
        """The JSON description of the encoding, stored in the model spec (hence in checkpoints)."""
        return self.spec.preprocess()


def load_csv(path: str | os.PathLike, task_column: str, target: str, features: tuple[str, ...] = (), *,
             kind: str = "regression", fill: str = "none", max_categories: int = 20,
             task_split: tuple[float, ...] = (0.7, 0.15, 0.15), min_rows: int = 1,
             small_tasks: str = "skip") -> TabularData:
    """Read, check, split and encode a CSV (see the module docstring for every rule): the encoding is
    :func:`mamlkit.data.tables.encode_file`'s, fitted on the meta-train tasks, and its standardisation on the
    meta-train tasks that have ``min_rows`` rows. Raises :class:`~mamlkit.base.errors.UserError` naming the
    problem and the fix for every bad input."""
    split_values: dict[str, list[str]] = {}

    def train_tasks(values: list[str]) -> list[str]:
        if len(task_split) != 3 or any(f < 0 for f in task_split) or abs(sum(task_split) - 1) > 1e-6:
            raise UserError(f"task_split must be three fractions (train val test) summing to 1, got {task_split}")
        split_values.update(split_tasks(values, task_split))
        return split_values["train"]

    table = tables.encode_file(path, task_column, target, tuple(features), kind=kind, fill=fill,
                               max_categories=max_categories, train_tasks=train_tasks)
    task = torch.from_numpy(table.task)
    splits, skipped = _keep_large(task, table.tasks, split_values, min_rows, small_tasks)
    stats = tables.standardise(table.x, table.y, tables.rows_of(table.task, splits["train"], len(table.tasks)),
                               table.spec, Path(path).expanduser(), target)
    spec = table.spec.with_stats(stats)
    return TabularData(table.x, table.y, task, table.tasks, spec.features, spec.categories, spec.classes, kind,
                       splits, split_values, skipped, table.dropped, stats.mean, stats.std, stats.target_mean,
                       stats.target_std, table.header, spec)


def _keep_large(task: Tensor, values: tuple[str, ...], split_values: dict[str, list[str]], min_rows: int,
                small_tasks: str) -> tuple[dict[str, list[int]], dict[str, int]]:
    """``(splits, skipped)``: per split the indices of its tasks with ``min_rows`` rows, and how many it has
    fewer (``small_tasks="skip"``; ``"error"`` refuses them)."""
    tid = {v: i for i, v in enumerate(values)}
    counts = torch.bincount(task, minlength=len(values))
    if small_tasks not in ("skip", "error"):
        raise UserError(f"small_tasks must be skip or error, got {small_tasks!r}")
    splits, skipped = {}, {}
    for s, vs in split_values.items():
        ids = [tid[v] for v in vs]
        small = [values[i] for i in ids if counts[i] < min_rows]
        if small and small_tasks == "error":
            raise UserError(f"{len(small)} {s} task(s) have fewer than {min_rows} rows (k_shot + k_query), "
                            f"e.g. {', '.join(map(repr, small[:5]))}; lower --k-shot/--k-query or pass "
                            "--small-tasks skip")
        splits[s] = [i for i in ids if counts[i] >= min_rows]
        skipped[s] = len(small)
        if not splits[s]:
            raise UserError(f"no {s} task has the {min_rows} rows (k_shot + k_query) an episode needs (largest "
                            f"has {int(counts[ids].max())}); lower --k-shot/--k-query")
    if any(skipped.values()):
        log.warning("mamlkit: skipped tasks with fewer than %d rows: %s", min_rows,
                    ", ".join(f"{n} {s}" for s, n in skipped.items()))
    return splits, skipped


@dataclass(frozen=True, eq=False)
class CSVTasks:
    """Episodes over the tasks of one split: ``sample(T, g)`` gives support ``x [T, K, F]`` (encoded,
    not standardised: the model standardises), ``y [T, K]`` (regression: float, standardised with the
    meta-train statistics; classification: int64 class ids) and query ``[T, Q, ...]``.

    Each task's rows are held as ids into ``data.x``, padded, ``index [S, M]`` with ``counts [S]`` (a few
    bytes per row, not a second copy of the features); row choice is the episode sampler's argsort of
    uniform noise, with padded slots pushed last.
    """

    data: TabularData
    split: str
    k_shot: int
    k_query: int

    def __post_init__(self) -> None:
        d = self.data
        ids = d.splits[self.split]
        per_task = torch.bincount(d.task, minlength=len(d.tasks))
        counts = per_task[ids]
        index = torch.zeros(len(ids), int(counts.max()), dtype=torch.long)  # padding: never drawn (see above)
        # Rows grouped by task in file order, GROUP_BLOCK rows at a time (a stable sort within the block and a
        # running count of each task's rows): a sort of the whole column would hold 1.5x to 4x its size again.
        slot = np.full(len(d.tasks), -1, dtype=np.int64)
        slot[ids] = np.arange(len(ids))
        met = np.zeros(len(d.tasks), dtype=np.int64)  # rows of each task in the blocks before
        task, rows = d.task.numpy(), index.numpy()
        for a in range(0, len(task), GROUP_BLOCK):
            t = task[a:a + GROUP_BLOCK]
            order = np.argsort(t, kind="stable")
            ts = t[order]
            ranks = np.arange(len(ts)) - np.searchsorted(ts, ts)  # place within its task in the block
            last = np.append(ts[1:] != ts[:-1], True)
            place = np.empty_like(order)
            place[order] = ranks
            place += met[t]
            met[ts[last]] += ranks[last] + 1
            where = slot[t]
            mine = np.flatnonzero(where >= 0)
            rows[where[mine], place[mine]] = a + mine
        if d.kind == "classification":
            y = d.y
        else:  # standardised in blocks too: no float64 copy of the target
            y = torch.empty(len(d.y), dtype=torch.float32)
            for a in range(0, len(y), GROUP_BLOCK):
                y[a:a + GROUP_BLOCK] = (d.y[a:a + GROUP_BLOCK] - d.target_mean) / d.target_std
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "targets", y)
        object.__setattr__(self, "counts", counts)

    @property
    def kind(self) -> str:
        return self.data.kind

    @property
    def num_tasks(self) -> int:
        return self.index.shape[0]

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(tasks [T], rows [T, K+Q])``: row ids within each task, distinct."""
        tasks = torch.randint(self.num_tasks, (num_tasks,), generator=generator)
        noise = torch.rand(num_tasks, self.index.shape[1], generator=generator)
        noise = noise.masked_fill(torch.arange(self.index.shape[1]) >= self.counts[tasks][:, None], 2.0)
        return tasks, noise.argsort(dim=-1)[:, :self.k_shot + self.k_query]

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        tasks, rows = self.sample_indices(num_tasks, generator)
        chosen = self.index[tasks[:, None], rows]
        x = self.data.x[chosen].float()
        y = self.targets[chosen]
        if self.kind == "regression":
            y = y[..., None]  # [T, n, 1]: the model's output shape
        K = self.k_shot
        return TaskBatch(x[:, :K], y[:, :K], x[:, K:], y[:, K:])


_CACHE: dict[tuple, TabularData] = {}


def load_for(cfg) -> TabularData:
    """The :class:`TabularData` of a config, read once per (file version, settings)."""
    path = Path(cfg.path).expanduser()
    if not cfg.path:
        raise UserError("the csv task needs a file: pass --path data.csv (with --task-column and --target)")
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat and stat.st_mtime_ns, stat and stat.st_size, cfg.task_column, cfg.target,
           tuple(cfg.features), cfg.kind, cfg.fill, cfg.max_categories, tuple(cfg.task_split),
           cfg.k_shot + cfg.k_query, cfg.small_tasks)
    if key not in _CACHE:
        _CACHE.clear()  # one file at a time is plenty
        _CACHE[key] = load_csv(path, cfg.task_column, cfg.target, tuple(cfg.features), kind=cfg.kind,
                               fill=cfg.fill, max_categories=cfg.max_categories,
                               task_split=tuple(cfg.task_split), min_rows=cfg.k_shot + cfg.k_query,
                               small_tasks=cfg.small_tasks)
    return _CACHE[key]


def build(cfg, split: str) -> CSVTasks:
    """The task family's builder: episodes of ``cfg.k_shot`` support and ``cfg.k_query`` query rows."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    return CSVTasks(load_for(cfg), split, cfg.k_shot, cfg.k_query)


def model_spec(cfg) -> dict:
    """An MLP behind a ``Standardize`` layer that holds the meta-train statistics (so checkpoints carry
    them); output 1 (regression) or one logit per class."""
    d = load_for(cfg)
    return {"name": "tabular_mlp", "in_features": d.num_features, "hidden": list(cfg.hidden_sizes),
            "out_features": 1 if d.kind == "regression" else len(d.classes),
            "mean": d.mean.tolist(), "std": d.std.tolist(), "preprocess": d.preprocess()}


def input_spec(cfg) -> dict:
    """Raw inputs are rows (column -> value); the encoding itself (features, categories, classes) is in the
    model spec's ``preprocess``."""
    return {"type": "table", "target": cfg.target, "task_column": cfg.task_column, "fill": cfg.fill}


SCRATCH_STEPS, SCRATCH_LR = 100, 1e-2  # the per-task-from-scratch baseline: full-batch Adam on the support rows


def report(cfg) -> Report:
    """MAML (and the pooled model, ``pretrain``, when trained) against a per-task model from scratch, on
    ``cfg.eval_tasks`` fixed test tasks: query loss (and accuracy), mean ± 95% CI, every pair compared on
    the same episodes. Regression losses are MSE on the standardised target and, ×σ², in the target's units."""
    d = load_for(cfg)
    reg = d.kind == "regression"
    var = d.target_std ** 2
    describe = (f"CSV tasks {cfg.path} (task column {cfg.task_column!r}, target {cfg.target!r}, {d.kind}): "
                f"{len(d.splits['train'])}/{len(d.splits['val'])}/{len(d.splits['test'])} train/val/test tasks "
                f"(skipped as too small: {d.skipped}; rows dropped for missing values: {d.dropped_rows}).",
                f"{cfg.eval_tasks} fixed test episodes, {cfg.k_shot} support / {cfg.k_query} query rows each, "
                f"inner SGD α={cfg.inner_lr}; mean ± 95% CI. "
                + (f"MSE on the standardised target (meta-train σ = {d.target_std:.4g}; × σ² for the target's "
                   "units)." if reg else "Query accuracy (%)."))
    columns = ((Column("loss", "query MSE (standardised)"), Column("loss", "query MSE (target units)", var))
               if reg else (Column("acc", "query accuracy (%)"), Column("loss", "query loss")))
    scratch = Baseline("scratch", "per-task from scratch (fresh MLP, support rows only)", "scratch",
                       steps=SCRATCH_STEPS, lr=SCRATCH_LR)
    return Report(table="methods", describe=describe, metric="loss", columns=columns,
                  steps=tuple(sorted(set(cfg.eval_steps) | {cfg.eval_inner_steps})),
                  learner_labels={"pretrain": "pooled (one model on all meta-train rows, fine-tuned like MAML)"},
                  baselines=(scratch,), compare="all_pairs",
                  facts={"kind": d.kind, "target_std": d.target_std,
                         "splits": {k: len(v) for k, v in d.splits.items()}, "skipped": d.skipped},
                  facts_first=("kind",), batch_size=100)


__all__ = ["TabularData", "CSVTasks", "load_csv", "split_tasks", "load_for", "build", "model_spec", "input_spec",
           "report"]
