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

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.tasks.family import Baseline, Column, Report

# The family-dependent config fields (config.TASK_FIELDS) this family reads.
USES = frozenset({"hidden_sizes", "path", "task_column", "target", "features", "kind", "fill", "max_categories",
                  "task_split", "small_tasks"})

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


def _lines(lines, limit: int = 10) -> str:
    lines = [str(n) for n in lines]
    return ", ".join(lines[:limit]) + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


class _Reread(Exception):
    """An error must name file lines, which the columnar reader does not track: read again, row by row."""


def _need(lines: np.ndarray | None) -> np.ndarray:
    if lines is None:
        raise _Reread
    return lines


def _read_columnar(path: Path) -> tuple[list[str], dict, None] | None:
    """``(header, stripped string columns, None)`` read by pyarrow's columnar CSV reader: a few bytes per
    value instead of a Python string each (a 200 MB file in a few hundred MB, not gigabytes). None when
    pyarrow is missing or the file has a problem, which the row reader then names with its line."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not first or not any(c.strip() for c in first):
        return None
    header = [c.strip() for c in first]
    if len(set(header)) != len(header):
        return None
    names = [f"c{k}" for k in range(len(header))]  # positional: spaces or a BOM in names do not matter
    try:
        table = pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False,
                                                 null_values=[]))
    except (pa.ArrowInvalid, OSError, UnicodeError):
        return None
    raw = {n: table.column(n) for n in names}
    del table
    cols = {c: pc.utf8_trim_whitespace(raw.pop(n)).combine_chunks() for c, n in zip(header, names)}  # one at a time
    blank = np.logical_and.reduce([pc.equal(v, "").to_numpy(zero_copy_only=False) for v in cols.values()])
    if blank.any():  # lines of empty fields only: skipped, as the row reader does
        keep = pa.array(~blank)
        cols = {c: v.filter(keep) for c, v in cols.items()}
    if not len(next(iter(cols.values()))):
        return None
    return header, cols, None


def _read_rows(path: Path) -> tuple[list[str], dict, np.ndarray]:
    """The row reader: every problem a UserError naming its line; the same columns as :func:`_read_columnar`
    and each row's line in the file."""
    import pyarrow as pa

    header, rows = read_csv_table(path)
    cols = {c: pa.array([r[j].strip() for r in rows], pa.string()) for j, c in enumerate(header)}
    return header, cols, np.array([int(r[-1]) for r in rows])


def _missing(col) -> np.ndarray:
    """Rows whose value is a missing-value spelling (``MISSING``, any case)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(pc.utf8_lower(col), value_set=pa.array(sorted(MISSING))).to_numpy(zero_copy_only=False)


def _numbers(col, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, parsed)``: float64 values (NaN where missing or not a number) and where a present value
    parsed as a number (as Python's ``float``; the distinct values are parsed when pyarrow's cast refuses)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    filled = pc.if_else(pa.array(missing), "0", col)
    try:
        values = pc.cast(filled, pa.float64()).to_numpy(zero_copy_only=False).copy()
        parsed = ~missing
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        enc = filled.dictionary_encode()
        uniq = [_float(v) for v in enc.dictionary.to_pylist()]
        idx = enc.indices.to_numpy(zero_copy_only=False)
        values = np.array([math.nan if v is None else v for v in uniq], dtype=np.float64)[idx]
        parsed = np.array([v is not None for v in uniq], dtype=bool)[idx] & ~missing
    values[~parsed] = math.nan
    return values, parsed


def _release() -> None:
    """Hand the memory of dropped Arrow arrays back to the system now (the allocator keeps it otherwise), so
    the encoded arrays take its place instead of adding to it."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _codes(col) -> tuple[list[str], np.ndarray]:
    """``(distinct values, each row's index into them)``."""
    enc = col.dictionary_encode()
    return enc.dictionary.to_pylist(), enc.indices.to_numpy(zero_copy_only=False)


def _check_finite(path: Path, col, values: np.ndarray, parsed: np.ndarray, lines, column: str) -> None:
    bad = np.flatnonzero(parsed & ~np.isfinite(values))
    if bad.size:
        raise UserError(f"{path} line {_need(lines)[bad[0]]} column {column!r} is {col[int(bad[0])].as_py()!r}: "
                        "not a finite number (values beyond ±1.8e308 overflow). Fix the value, or leave the cell "
                        "empty to mark it missing")


def load_csv(path: str | os.PathLike, task_column: str, target: str, features: tuple[str, ...] = (), *,
             kind: str = "regression", fill: str = "none", max_categories: int = 20,
             task_split: tuple[float, ...] = (0.7, 0.15, 0.15), min_rows: int = 1,
             small_tasks: str = "skip") -> TabularData:
    """Read, check, split and encode a CSV (see the module docstring for every rule).

    The file is read column by column (pyarrow) and encoded as arrays; when an error must name file
    lines, it is read again row by row to name them. Raises :class:`~mamlkit.base.errors.UserError` naming
    the problem and the fix for every bad input.
    """
    path = Path(path).expanduser()
    if kind not in KINDS:
        raise UserError(f"kind must be regression or classification, got {kind!r}")
    if fill not in FILLS:
        raise UserError(f"fill must be none, drop or mean, got {fill!r}")
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}. Pass the file with --path FILE.")
    args = (path, task_column, target, tuple(features), kind, fill, max_categories, tuple(task_split), min_rows,
            small_tasks)
    columnar = _read_columnar(path)
    if columnar is not None:
        try:
            return _encode(*columnar, *args)
        except _Reread:
            pass
    return _encode(*_read_rows(path), *args)


def _encode(header: list[str], cols: dict, lines: np.ndarray | None, path: Path, task_column: str, target: str,
            features: tuple[str, ...], kind: str, fill: str, max_categories: int, task_split: tuple[float, ...],
            min_rows: int, small_tasks: str) -> TabularData:
    import pyarrow as pa

    names_txt = ", ".join(header)
    if not task_column:
        raise UserError(f"name the task column with --task-column; {path} has columns: {names_txt}")
    if not target:
        raise UserError(f"name the target column with --target; {path} has columns: {names_txt}")
    for flag, name in [("--task-column", task_column), ("--target", target)] + \
            [("--features", f) for f in features]:
        if name not in header:
            raise UserError(f"{flag}: column {name!r} is not in {path}; its columns are: {names_txt}")
    if target == task_column:
        raise UserError(f"--target and --task-column are both {target!r}; they must differ")
    feats = list(features) or [c for c in header if c not in (task_column, target)]
    for bad, what in ((target, "target"), (task_column, "task column")):
        if bad in feats:
            raise UserError(f"--features lists the {what} {bad!r}; leave it out of the features")
    if not feats:
        raise UserError(f"{path} has no feature columns besides {task_column!r} and {target!r}")

    # Missing values.
    used = [task_column, target, *feats]
    cols = {c: cols[c] for c in dict.fromkeys(used)}
    miss = {c: _missing(cols[c]) for c in cols}
    missing = np.logical_or.reduce([miss[c] for c in used])
    dropped = 0
    if missing.any():
        rows_missing = np.flatnonzero(missing)
        where = sorted(c for c in cols if miss[c].any())
        if fill == "none":
            raise UserError(f"{path}: {len(rows_missing)} row(s) have missing values (lines "
                            f"{_lines(_need(lines)[rows_missing])}; columns {', '.join(where)}). Fix the file, or "
                            "pass --fill drop (drop those rows) or --fill mean (fill numeric features with their "
                            "meta-train mean)")
        key_missing = np.flatnonzero(miss[task_column] | miss[target])
        if fill == "mean" and key_missing.size:
            raise UserError(f"{path}: {len(key_missing)} row(s) miss the task or target value (lines "
                            f"{_lines(_need(lines)[key_missing])}); these cannot be filled: pass --fill drop")
        if fill == "drop":
            keep = ~missing
            if not keep.any():
                raise UserError(f"{path}: every row has a missing value; --fill drop leaves nothing")
            mask = pa.array(keep)
            cols = {c: v.filter(mask) for c, v in cols.items()}
            miss = {c: m[keep] for c, m in miss.items()}
            lines = lines[keep] if lines is not None else None
            dropped = len(rows_missing)

    # Task split (by task value, never by row).
    task_values, task_idx = _codes(cols[task_column])
    values = sorted(task_values)
    if len(task_split) != 3 or any(f < 0 for f in task_split) or abs(sum(task_split) - 1) > 1e-6:
        raise UserError(f"task_split must be three fractions (train val test) summing to 1, got {task_split}")
    split_values = split_tasks(values, task_split)
    tid = {v: i for i, v in enumerate(values)}
    task_np = np.array([tid[v] for v in task_values], dtype=np.int64)[task_idx]
    train_mask = np.isin(task_np, [tid[v] for v in split_values["train"]])

    # Target.
    if kind == "regression":
        ys, parsed = _numbers(cols[target], miss[target])
        _check_finite(path, cols[target], ys, parsed, lines, target)
        bad = np.flatnonzero(~parsed)
        if bad.size:
            raise UserError(f"{path} line {_need(lines)[bad[0]]}: target {target!r} is "
                            f"{cols[target][int(bad[0])].as_py()!r}, not a number; a regression target must be "
                            "numeric (use --kind classification for labels)")
        y = torch.from_numpy(ys)
        classes: tuple[str, ...] = ()
    else:
        labels, label_idx = _codes(cols[target])
        classes = tuple(sorted(set(labels)))
        if len(classes) < 2:
            raise UserError(f"classification needs at least 2 distinct values in {target!r}; it has "
                            f"{len(classes)}. Use --kind regression for a numeric target")
        if len(classes) > max(max_categories, 2) and all(_number(c) is not None for c in classes):
            raise UserError(f"target {target!r} has {len(classes)} distinct numeric values; that looks like "
                            "a regression target: pass --kind regression (or raise --max-categories)")
        cid = {c: i for i, c in enumerate(classes)}
        y = torch.from_numpy(np.array([cid[v] for v in labels], dtype=np.int64)[label_idx])

    # Features: numeric as they are, categorical one-hot over meta-train categories. Each column's strings
    # are dropped once it is encoded, and x is filled in place, so the file is never held twice.
    encoded, names, categories = [], [], {}
    for c in feats:
        col, absent = cols.pop(c) if c not in (task_column, target) else cols[c], miss[c]
        num, parsed = _numbers(col, absent)
        _check_finite(path, col, num, parsed, lines, c)  # else "inf" would make a numeric column look categorical
        if (parsed | absent).all():
            if fill == "mean" and absent.any():
                tr = num[train_mask & ~absent]
                num[absent] = tr.mean() if tr.size else 0.0
            encoded.append(num)
            names.append(c)
        else:
            del num
            seen, idx = _codes(col)
            in_train = np.zeros(len(seen), dtype=bool)
            in_train[np.unique(idx[train_mask & ~absent])] = True
            cats = sorted(v for v, t in zip(seen, in_train) if t)
            if len(cats) > max_categories:
                raise UserError(f"column {c!r} is categorical with {len(cats)} categories in the meta-train "
                                f"tasks, over the cap of {max_categories}; raise --max-categories, or leave it "
                                "out with --features (or encode it as numbers yourself)")
            categories[c] = cats
            pos = {v: i for i, v in enumerate(cats)}
            encoded.append(np.array([pos.get(v, -1) for v in seen], dtype=np.int32)[idx])
            names += [f"{c}={v}" for v in cats]
        del col
        _release()
    cols.clear()
    _release()
    x = torch.zeros(len(task_np), len(names), dtype=torch.float64)
    j = 0
    for c in feats:
        part = encoded.pop(0)
        if c in categories:
            known = np.flatnonzero(part >= 0)
            x[torch.from_numpy(known), j + torch.from_numpy(part[known].astype(np.int64))] = 1.0
            j += len(categories[c])
        else:
            x[:, j] = torch.from_numpy(part)
            j += 1
        del part

    # Tasks and their splits; small tasks skipped (or refused).
    task = torch.from_numpy(task_np)
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
    mean, std = torch.empty(x.shape[1], dtype=x.dtype), torch.empty(x.shape[1], dtype=x.dtype)
    for k in range(x.shape[1]):  # column by column: no copy of the whole meta-train block
        mean[k], std[k] = x[:, k][tr_mask].mean(), x[:, k][tr_mask].std(unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    if kind == "regression":
        yt = y[tr_mask]
        target_mean, target_std = yt.mean().item(), yt.std(unbiased=False).item() or 1.0
    else:
        target_mean, target_std = 0.0, 1.0
    # Training runs in float32 on standardised values: every statistic must be finite and every value
    # representable there, or the run would train to "inf ± nan".
    big = torch.finfo(torch.float32).max
    too_big = [(n, x[:, k]) for k, n in enumerate(names)
               if not (mean[k].isfinite() and std[k].isfinite() and x[:, k].abs().max() <= big)]
    if kind == "regression" and not (math.isfinite(target_mean) and math.isfinite(target_std)
                                     and y.abs().max() <= big):
        too_big.insert(0, (target, y))
    if too_big:
        n, col = too_big[0]
        raise UserError(f"{path}: column {n!r} holds values up to {col.abs().max().item():.3g}, too large to "
                        f"standardise in float32 (max {big:.3g}); rescale it (e.g. divide by a power of 10)")
    return TabularData(x, y, task, tuple(values), tuple(names), categories, classes, kind, splits,
                       split_values, skipped, dropped, mean, std, target_mean, target_std, tuple(header))


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
        # rows grouped by task with one stable sort (file order within a task), not one scan per task
        order = torch.argsort(d.task, stable=True)
        owner = d.task[order]
        pos = torch.arange(len(order)) - (torch.cumsum(per_task, 0) - per_task)[owner]  # place within its task
        slot = torch.full((len(d.tasks),), -1, dtype=torch.long)
        slot[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
        mine = slot[owner] >= 0
        index[slot[owner[mine]], pos[mine]] = order[mine]
        y = d.y if d.kind == "classification" else ((d.y - d.target_mean) / d.target_std).float()
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
