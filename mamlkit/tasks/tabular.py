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

Episodes: a task of the split drawn uniformly, then ``k_shot`` support and ``k_query`` query rows
drawn without replacement within that task (support and query never share a row). For
classification the counts are rows per task, not per class (CSV tasks need not hold every class),
and the classes are the sorted distinct target values of the whole file.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.tasks.family import Baseline, Column, Report

log = logging.getLogger("mamlkit")

SPLIT_SEED = 1
MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})
KINDS = ("regression", "classification")
FILLS = ("none", "drop", "mean")


def _is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING


def _number(value: str) -> float | None:
    try:
        v = float(value)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


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

    def preprocess(self) -> dict:
        """The JSON description of the encoding, stored in the model spec (hence in checkpoints)."""
        return {"features": list(self.feature_names), "categories": self.categories,
                "classes": list(self.classes), "kind": self.kind, "target_mean": self.target_mean,
                "target_std": self.target_std}


def read_csv_table(path: Path, hint: str = " Pass the file with --path FILE.") -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a CSV file with a header line; each row ends with its line number in the file.
    Every problem (no file, not UTF-8, no header, duplicate names, a ragged line, no rows) is a UserError."""
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}.{hint}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} as a UTF-8 CSV file ({e})") from None
    if not rows or not any(c.strip() for c in rows[0]):
        raise UserError(f"{path} is empty: the first line must hold the column names")
    header = [c.strip() for c in rows[0]]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise UserError(f"{path} has duplicate column names: {', '.join(dupes)}; rename them")
    body = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue  # blank lines
        if len(row) != len(header):
            raise UserError(f"{path} line {line} has {len(row)} fields, the header {len(header)}; fix the "
                            "line (a missing comma or an unquoted comma inside a value)")
        body.append(row + [str(line)])
    if not body:
        raise UserError(f"{path} has a header but no data rows")
    return header, body


def _lines(rows: list[list[str]], limit: int = 10) -> str:
    lines = [r[-1] for r in rows]
    return ", ".join(lines[:limit]) + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def load_csv(path: str | os.PathLike, task_column: str, target: str, features: tuple[str, ...] = (), *,
             kind: str = "regression", fill: str = "none", max_categories: int = 20,
             task_split: tuple[float, ...] = (0.7, 0.15, 0.15), min_rows: int = 1,
             small_tasks: str = "skip") -> TabularData:
    """Read, check, split and encode a CSV (see the module docstring for every rule).

    Raises :class:`~mamlkit.base.errors.UserError` naming the problem and the fix for every bad input.
    """
    path = Path(path).expanduser()
    if kind not in KINDS:
        raise UserError(f"kind must be regression or classification, got {kind!r}")
    if fill not in FILLS:
        raise UserError(f"fill must be none, drop or mean, got {fill!r}")
    header, rows = read_csv_table(path)
    cols = ", ".join(header)
    if not task_column:
        raise UserError(f"name the task column with --task-column; {path} has columns: {cols}")
    if not target:
        raise UserError(f"name the target column with --target; {path} has columns: {cols}")
    for flag, name in [("--task-column", task_column), ("--target", target)] + \
            [("--features", f) for f in features]:
        if name not in header:
            raise UserError(f"{flag}: column {name!r} is not in {path}; its columns are: {cols}")
    if target == task_column:
        raise UserError(f"--target and --task-column are both {target!r}; they must differ")
    feats = list(features) or [c for c in header if c not in (task_column, target)]
    for bad, what in ((target, "target"), (task_column, "task column")):
        if bad in feats:
            raise UserError(f"--features lists the {what} {bad!r}; leave it out of the features")
    if not feats:
        raise UserError(f"{path} has no feature columns besides {task_column!r} and {target!r}")
    idx = {c: header.index(c) for c in header}
    ti, yi = idx[task_column], idx[target]

    # Missing values.
    used = [task_column, target, *feats]
    missing = [r for r in rows if any(_is_missing(r[idx[c]]) for c in used)]
    dropped = 0
    if missing:
        where = sorted({c for r in missing for c in used if _is_missing(r[idx[c]])})
        if fill == "none":
            raise UserError(f"{path}: {len(missing)} row(s) have missing values (lines {_lines(missing)}; "
                            f"columns {', '.join(where)}). Fix the file, or pass --fill drop (drop those "
                            "rows) or --fill mean (fill numeric features with their meta-train mean)")
        key_missing = [r for r in missing if _is_missing(r[ti]) or _is_missing(r[yi])]
        if fill == "mean" and key_missing:
            raise UserError(f"{path}: {len(key_missing)} row(s) miss the task or target value (lines "
                            f"{_lines(key_missing)}); these cannot be filled: pass --fill drop")
        if fill == "drop":
            drop = {id(r) for r in missing}
            rows = [r for r in rows if id(r) not in drop]
            dropped = len(missing)
            if not rows:
                raise UserError(f"{path}: every row has a missing value; --fill drop leaves nothing")

    # Task split (by task value, never by row).
    values = sorted({r[ti].strip() for r in rows})
    if len(task_split) != 3 or any(f < 0 for f in task_split) or abs(sum(task_split) - 1) > 1e-6:
        raise UserError(f"task_split must be three fractions (train val test) summing to 1, got {task_split}")
    split_values = split_tasks(values, task_split)
    split_of = {v: s for s, vs in split_values.items() for v in vs}
    train_rows = [r for r in rows if split_of[r[ti].strip()] == "train"]

    # Target.
    if kind == "regression":
        ys = []
        for r in rows:
            v = _number(r[yi])
            if v is None:
                raise UserError(f"{path} line {r[-1]}: target {target!r} is {r[yi]!r}, not a number; a "
                                "regression target must be numeric (use --kind classification for labels)")
            ys.append(v)
        y = torch.tensor(ys, dtype=torch.float64)
        classes: tuple[str, ...] = ()
    else:
        classes = tuple(sorted({r[yi].strip() for r in rows}))
        if len(classes) < 2:
            raise UserError(f"classification needs at least 2 distinct values in {target!r}; it has "
                            f"{len(classes)}. Use --kind regression for a numeric target")
        if len(classes) > max(max_categories, 2) and all(_number(c) is not None for c in classes):
            raise UserError(f"target {target!r} has {len(classes)} distinct numeric values; that looks like "
                            "a regression target: pass --kind regression (or raise --max-categories)")
        cid = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([cid[r[yi].strip()] for r in rows], dtype=torch.long)

    # Features: numeric as they are, categorical one-hot over meta-train categories.
    columns, names, categories = [], [], {}
    for c in feats:
        j = idx[c]
        present = [r[j] for r in rows if not _is_missing(r[j])]
        if all(_number(v) is not None for v in present):
            vals = [math.nan if _is_missing(r[j]) else _number(r[j]) for r in rows]
            col = torch.tensor(vals, dtype=torch.float64)
            if fill == "mean" and col.isnan().any():
                tr = torch.tensor([math.nan if _is_missing(r[j]) else _number(r[j]) for r in train_rows],
                                  dtype=torch.float64)
                fillv = tr.nanmean().item() if (~tr.isnan()).any() else 0.0
                col = torch.where(col.isnan(), torch.full_like(col, fillv), col)
            columns.append(col[:, None])
            names.append(c)
        else:
            cats = sorted({r[j].strip() for r in train_rows if not _is_missing(r[j])})
            if len(cats) > max_categories:
                raise UserError(f"column {c!r} is categorical with {len(cats)} categories in the meta-train "
                                f"tasks, over the cap of {max_categories}; raise --max-categories, or leave it "
                                "out with --features (or encode it as numbers yourself)")
            categories[c] = cats
            pos = {v: i for i, v in enumerate(cats)}
            onehot = torch.zeros(len(rows), len(cats), dtype=torch.float64)
            for i, r in enumerate(rows):
                k = pos.get(r[j].strip())
                if k is not None:
                    onehot[i, k] = 1.0
            columns.append(onehot)
            names += [f"{c}={v}" for v in cats]
    x = torch.cat(columns, dim=1)

    # Tasks and their splits; small tasks skipped (or refused).
    tid = {v: i for i, v in enumerate(values)}
    task = torch.tensor([tid[r[ti].strip()] for r in rows], dtype=torch.long)
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

    # Standardisation from meta-train rows only.
    tr_mask = torch.isin(task, torch.tensor(splits["train"]))
    xt = x[tr_mask]
    mean = xt.mean(0)
    std = xt.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    if kind == "regression":
        yt = y[tr_mask]
        target_mean, target_std = yt.mean().item(), yt.std(unbiased=False).item() or 1.0
    else:
        target_mean, target_std = 0.0, 1.0
    return TabularData(x, y, task, tuple(values), tuple(names), categories, classes, kind, splits,
                       split_values, skipped, dropped, mean, std, target_mean, target_std, tuple(header))


@dataclass(frozen=True, eq=False)
class CSVTasks:
    """Episodes over the tasks of one split: ``sample(T, g)`` gives support ``x [T, K, F]`` (encoded,
    not standardised: the model standardises), ``y [T, K]`` (regression: float, standardised with the
    meta-train statistics; classification: int64 class ids) and query ``[T, Q, ...]``.

    Rows are held padded per task, ``rows [S, M, F]`` with ``counts [S]``; row choice is the episode
    sampler's argsort of uniform noise, with padded slots pushed last.
    """

    data: TabularData
    split: str
    k_shot: int
    k_query: int

    def __post_init__(self) -> None:
        d = self.data
        ids = d.splits[self.split]
        counts = torch.bincount(d.task, minlength=len(d.tasks))[ids]
        M = int(counts.max())
        rows = torch.zeros(len(ids), M, d.num_features, dtype=torch.float32)
        ys = torch.zeros(len(ids), M, dtype=d.y.dtype)
        y = d.y if d.kind == "classification" else (d.y - d.target_mean) / d.target_std
        for s, t in enumerate(ids):
            sel = (d.task == t).nonzero().squeeze(1)
            rows[s, :len(sel)] = d.x[sel].float()
            ys[s, :len(sel)] = y[sel]
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "targets", ys if d.kind == "classification" else ys.float())
        object.__setattr__(self, "counts", counts)

    @property
    def kind(self) -> str:
        return self.data.kind

    @property
    def num_tasks(self) -> int:
        return self.rows.shape[0]

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(tasks [T], rows [T, K+Q])``: row ids within each task, distinct."""
        tasks = torch.randint(self.num_tasks, (num_tasks,), generator=generator)
        noise = torch.rand(num_tasks, self.rows.shape[1], generator=generator)
        noise = noise.masked_fill(torch.arange(self.rows.shape[1]) >= self.counts[tasks][:, None], 2.0)
        return tasks, noise.argsort(dim=-1)[:, :self.k_shot + self.k_query]

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        tasks, rows = self.sample_indices(num_tasks, generator)
        x = self.rows[tasks[:, None], rows]
        y = self.targets[tasks[:, None], rows]
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


def derived(cfg) -> dict:
    """The kind of a CSV task picks its loss, so ``--kind classification`` suffices."""
    return {"loss": "mse" if cfg.kind == "regression" else "cross_entropy"}


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
           "derived", "report"]
