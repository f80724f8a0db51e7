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
import functools
import hashlib
import itertools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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


def _records(path: Path, hint: str) -> Iterator:
    """The header (stripped names), then ``(row, line)`` for every data row, read one row at a time (blank
    lines skipped). Every problem (no file, not UTF-8, no header, duplicate names, a ragged line, no rows) is a
    UserError naming its line."""
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}.{hint}")
    rows = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            first = next(reader, None)
            if not first or not any(c.strip() for c in first):
                raise UserError(f"{path} is empty: the first line must hold the column names")
            header = [c.strip() for c in first]
            dupes = sorted({c for c in header if header.count(c) > 1})
            if dupes:
                raise UserError(f"{path} has duplicate column names: {', '.join(dupes)}; rename them")
            yield header
            for line, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue  # blank lines
                if len(row) != len(header):
                    raise UserError(f"{path} line {line} has {len(row)} fields, the header {len(header)}; fix the "
                                    "line (a missing comma or an unquoted comma inside a value)")
                rows += 1
                yield row, line
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} as a UTF-8 CSV file ({e})") from None
    if not rows:
        raise UserError(f"{path} has a header but no data rows")


def read_csv_table(path: Path, hint: str = " Pass the file with --path FILE.") -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a CSV file with a header line; each row ends with its line number in the file.
    Every problem (no file, not UTF-8, no header, duplicate names, a ragged line, no rows) is a UserError."""
    records = _records(path, hint)
    header = next(records)
    return header, [row + [str(line)] for row, line in records]


class _Reread(Exception):
    """An error must name file lines, which the columnar reader does not track: read again, row by row."""


# A CSV task file is streamed in batches, never held whole: the memory in flight is a few MB whatever the file.
ARROW_BLOCK = 1 << 17  # bytes of the file per batch of the columnar reader (it reads up to 32 batches ahead)
RELEASE_ROWS = 1 << 17  # the Arrow memory pool gives freed memory back to the system every so many rows
ROW_BATCH = 1 << 14    # rows per batch of the row reader
GROUP_BLOCK = 1 << 16  # rows per step when one-hot columns are written and rows are grouped by task


def _arrow_header(path: Path) -> list[str] | None:
    """The header when the columnar reader can take the file from there; None leaves the file to the row
    reader, which names the problem."""
    records = _records(path, "")
    try:
        return next(records)
    except UserError:
        return None
    finally:
        records.close()


def _arrow_batches(path: Path, header: list[str], columns: list[str]) -> Iterator[tuple[dict, None]]:
    """Batches of ``(column -> stripped strings, None)`` from pyarrow's streaming CSV reader, ``ARROW_BLOCK``
    bytes of the file at a time; lines of empty fields are skipped, as the row reader does. The reader knows
    no lines: a file it refuses raises _Reread, for the row reader to name the problem and its line."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    names = [f"c{k}" for k in range(len(header))]  # positional: spaces or a BOM in names do not matter
    want = [header.index(c) for c in columns]
    rows = 0
    try:
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False,
                                                 block_size=ARROW_BLOCK),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False,
                                                 null_values=[]))
        for batch in reader:
            cols = [pc.utf8_trim_whitespace(batch.column(k)) for k in range(len(names))]
            del batch
            blank = np.logical_and.reduce([pc.equal(v, "").to_numpy(zero_copy_only=False) for v in cols])
            if blank.all():
                continue
            if blank.any():
                keep = pa.array(~blank)
                cols = [v.filter(keep) if k in want else v for k, v in enumerate(cols)]
            rows += len(cols[0])
            yield {c: cols[k] for c, k in zip(columns, want)}, None
            if rows // RELEASE_ROWS != (rows - len(cols[0])) // RELEASE_ROWS:
                _release()
    except (pa.ArrowInvalid, OSError, UnicodeError):
        raise _Reread from None
    if not rows:
        raise _Reread


def _row_batches(path: Path, columns: list[str]) -> Iterator[tuple[dict, np.ndarray]]:
    """Batches of ``(column -> stripped strings, each row's line in the file)`` from Python's row reader,
    ``ROW_BATCH`` rows at a time: every problem a UserError naming its line."""
    import pyarrow as pa

    records = _records(path, " Pass the file with --path FILE.")
    header = next(records)
    want = [header.index(c) for c in columns]
    while chunk := list(itertools.islice(records, ROW_BATCH)):
        yield ({c: pa.array([r[k].strip() for r, _ in chunk], pa.string()) for c, k in zip(columns, want)},
               np.array([line for _, line in chunk]))


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


class _Codes:
    """The distinct strings of a column, numbered in order of first appearance across batches: one Python
    string per distinct value, nothing per row."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def add(self, col, absent: np.ndarray | None = None) -> np.ndarray:
        """Each row's code (int64; missing values -1), numbering the values not seen before."""
        enc = col.dictionary_encode()
        lut = np.array([self.index.setdefault(v, len(self.index)) for v in enc.dictionary.to_pylist()],
                       dtype=np.int64)
        codes = lut[enc.indices.to_numpy(zero_copy_only=False)]
        if absent is not None:
            codes[absent] = -1
        return codes

    def lookup(self, col, ranks: np.ndarray) -> np.ndarray:
        """Each row's ``ranks[code]`` (-1 for a value not seen before)."""
        enc = col.dictionary_encode()
        lut = ranks[np.array([self.index.get(v, -1) for v in enc.dictionary.to_pylist()], dtype=np.int64)]
        return lut[enc.indices.to_numpy(zero_copy_only=False)]

    def ranks(self, values: list[str]) -> np.ndarray:
        """``lut`` with ``lut[code]`` = the index of the code's value in ``values``, -1 where it is not there
        (``lut[-1]``, missing or unseen, is -1 too)."""
        pos = {v: i for i, v in enumerate(values)}
        return np.array([pos.get(v, -1) for v in self.index] + [-1], dtype=np.int64)


class _Pairs:
    """The distinct (task code, value code) pairs of a categorical column, as sorted int64 keys: which values
    occur in which tasks, for the categories of meta-train rows, without a code per row."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.held = self.compact = 0

    def add(self, tasks: np.ndarray, codes: np.ndarray) -> None:
        present = codes >= 0
        self.parts.append(np.unique((tasks[present] << 32) | codes[present]))
        self.held += len(self.parts[-1])
        if self.held > 2 * self.compact + (1 << 16):
            self.parts = [self.keys()]
            self.held = self.compact = len(self.parts[0])

    def keys(self) -> np.ndarray:
        return np.unique(np.concatenate(self.parts)) if self.parts else np.zeros(0, dtype=np.int64)

    def values_in(self, tasks: np.ndarray) -> np.ndarray:
        """The value codes that occur in any of the task codes ``tasks``."""
        keys = self.keys()
        return np.unique(keys[np.isin(keys >> 32, tasks)] & 0xFFFFFFFF)


class _Lines:
    """Rows with a problem: how many, and the file lines of the first few."""

    LIMIT = 10

    def __init__(self) -> None:
        self.count, self.lines = 0, []

    def add(self, rows: np.ndarray, lines: np.ndarray | None) -> None:
        if lines is None:
            raise _Reread
        self.count += rows.size
        self.lines += lines[rows[:max(self.LIMIT - len(self.lines), 0)]].tolist()

    def __str__(self) -> str:
        more = self.count - len(self.lines)
        return ", ".join(map(str, self.lines)) + (f" and {more} more" if more else "")


class _Scan:
    """The first pass over a CSV: rows kept, the distinct tasks and labels, which features are numeric, the
    values of categorical ones and the tasks they occur in, and the first row of every problem with its line
    (the columnar reader knows no lines: a problem there raises _Reread). Nothing is kept per row but, under
    ``--fill drop``, which rows are kept."""

    def __init__(self, task_column: str, target: str, feats: list[str], kind: str, fill: str) -> None:
        self.task_column, self.target, self.feats, self.kind, self.fill = task_column, target, feats, kind, fill
        self.rows = self.dropped = self.read = 0
        self.keep: list[np.ndarray] = []  # --fill drop: each batch's rows kept
        self.missing, self.key_missing, self.missing_cols = _Lines(), _Lines(), set()
        self.tasks, self.labels = _Codes(), _Codes()
        self.numeric = dict.fromkeys(feats, True)
        self.cats: dict[str, _Codes] = {}
        self.pairs: dict[str, _Pairs] = {}
        self.late: set[str] = set()  # found categorical after numeric-looking rows: paired in a pass of their own
        self.nonfinite: dict[str, tuple[int, str]] = {}  # column -> (line, value) of its first non-finite number
        self.not_number: tuple[int, str] | None = None  # the first regression target that is no number

    def add(self, cols: dict, lines: np.ndarray | None) -> None:
        import pyarrow as pa

        miss = {c: _missing(v) for c, v in cols.items()}
        missing = np.logical_or.reduce(list(miss.values()))
        self.read += len(missing)
        if self.fill == "drop":
            keep = ~missing
            self.keep.append(keep)
            if not keep.all():
                self.dropped += int(missing.sum())
                mask = pa.array(keep)
                cols = {c: v.filter(mask) for c, v in cols.items()}
                miss = {c: m[keep] for c, m in miss.items()}
                lines = lines[keep] if lines is not None else None
        elif missing.any() and self.fill == "none":
            self.missing.add(np.flatnonzero(missing), lines)
            self.missing_cols |= {c for c, m in miss.items() if m.any()}
        elif missing.any():
            key = miss[self.task_column] | miss[self.target]
            if key.any():
                self.key_missing.add(np.flatnonzero(key), lines)
        if self.missing.count or self.key_missing.count or not len(miss[self.target]):
            return  # those errors come first: only their rows are counted from here on
        tasks = self.tasks.add(cols[self.task_column])
        if self.kind == "regression":
            ys, parsed = _numbers(cols[self.target], miss[self.target])
            self._finite(self.target, cols[self.target], ys, parsed, lines)
            bad = np.flatnonzero(~parsed)
            if bad.size and self.not_number is None:
                self.not_number = (self._line(lines, bad[0]), cols[self.target][int(bad[0])].as_py())
        else:
            self.labels.add(cols[self.target])
        for c in self.feats:
            num, parsed = _numbers(cols[c], miss[c])
            self._finite(c, cols[c], num, parsed, lines)  # else "inf" would make a numeric column look categorical
            if self.numeric[c] and not (parsed | miss[c]).all():
                self.numeric[c] = False
                self.cats[c], self.pairs[c] = _Codes(), _Pairs()
                if self.rows:
                    self.late.add(c)
            if not self.numeric[c] and c not in self.late:
                self.pairs[c].add(tasks, self.cats[c].add(cols[c], miss[c]))
        self.rows += len(tasks)

    @staticmethod
    def _line(lines: np.ndarray | None, row) -> int:
        if lines is None:
            raise _Reread
        return int(lines[row])

    def _finite(self, column: str, col, values: np.ndarray, parsed: np.ndarray, lines) -> None:
        bad = np.flatnonzero(parsed & ~np.isfinite(values))
        if bad.size and column not in self.nonfinite:
            self.nonfinite[column] = (self._line(lines, bad[0]), col[int(bad[0])].as_py())

    def kept(self) -> np.ndarray | None:
        """Which of the rows read are kept (None: all of them)."""
        keep = np.concatenate(self.keep) if self.dropped else None
        self.keep.clear()
        return keep


def _kept_batches(batches, columns: list[str], keep: np.ndarray | None, read: int, path: Path) -> Iterator[dict]:
    """The batches of a later pass over the file, with the rows of the first pass kept; a file that changed in
    between is an error."""
    import pyarrow as pa

    start = 0
    for cols, _ in batches(columns):
        n = len(cols[columns[0]])
        if start + n > read:
            break
        if keep is not None and not keep[start:start + n].all():
            mask = pa.array(keep[start:start + n])
            cols = {c: v.filter(mask) for c, v in cols.items()}
        start += n
        yield cols
    if start != read:
        raise UserError(f"{path} changed while it was read; run again once it is complete")


def _rows_of(task: np.ndarray, ids: list[int], num_tasks: int) -> np.ndarray:
    """Which rows belong to the tasks ``ids``: a table lookup (``isin`` sorts copies of the whole column)."""
    table = np.zeros(num_tasks, dtype=bool)
    table[ids] = True
    return table[task]


def _largest(col: Tensor) -> float:
    """``max |col|`` with no copy of the column (torch's reductions copy a strided column, some of them
    several times; numpy's do not)."""
    values = col.numpy()
    return max(-values.min().item(), values.max().item())


def _check_finite(path: Path, column: str, scan: _Scan) -> None:
    if column in scan.nonfinite:
        line, value = scan.nonfinite[column]
        raise UserError(f"{path} line {line} column {column!r} is {value!r}: not a finite number (values beyond "
                        "±1.8e308 overflow). Fix the value, or leave the cell empty to mark it missing")


def load_csv(path: str | os.PathLike, task_column: str, target: str, features: tuple[str, ...] = (), *,
             kind: str = "regression", fill: str = "none", max_categories: int = 20,
             task_split: tuple[float, ...] = (0.7, 0.15, 0.15), min_rows: int = 1,
             small_tasks: str = "skip") -> TabularData:
    """Read, check, split and encode a CSV (see the module docstring for every rule).

    The file is streamed twice in small batches (pyarrow's streaming reader), never held whole: the first pass
    finds the tasks, labels, column kinds and categories and every problem; the second writes each row's
    values into the preallocated ``x``, ``y`` and ``task``. When an error must name file lines, the passes
    are made by Python's row reader instead, which knows them. Raises
    :class:`~mamlkit.base.errors.UserError` naming the problem and the fix for every bad input.
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
    header = _arrow_header(path)
    if header is not None:
        try:
            return _encode(header, functools.partial(_arrow_batches, path, header), *args)
        except _Reread:
            pass
        finally:
            _release()
    records = _records(path, " Pass the file with --path FILE.")
    header = next(records)
    records.close()
    return _encode(header, functools.partial(_row_batches, path), *args)


def _encode(header: list[str], batches, path: Path, task_column: str, target: str, features: tuple[str, ...],
            kind: str, fill: str, max_categories: int, task_split: tuple[float, ...], min_rows: int,
            small_tasks: str) -> TabularData:
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

    # First pass: tasks, labels, column kinds, categories and problems.
    used = list(dict.fromkeys([task_column, target, *feats]))
    scan = _Scan(task_column, target, feats, kind, fill)
    for cols, lines in batches(used):
        scan.add(cols, lines)

    # Missing values.
    if scan.missing.count:
        raise UserError(f"{path}: {scan.missing.count} row(s) have missing values (lines {scan.missing}; columns "
                        f"{', '.join(sorted(scan.missing_cols))}). Fix the file, or pass --fill drop (drop those "
                        "rows) or --fill mean (fill numeric features with their meta-train mean)")
    if scan.key_missing.count:
        raise UserError(f"{path}: {scan.key_missing.count} row(s) miss the task or target value (lines "
                        f"{scan.key_missing}); these cannot be filled: pass --fill drop")
    if not scan.rows:
        raise UserError(f"{path}: every row has a missing value; --fill drop leaves nothing")
    keep = scan.kept()

    # Task split (by task value, never by row).
    values = sorted(scan.tasks.index)
    if len(task_split) != 3 or any(f < 0 for f in task_split) or abs(sum(task_split) - 1) > 1e-6:
        raise UserError(f"task_split must be three fractions (train val test) summing to 1, got {task_split}")
    split_values = split_tasks(values, task_split)
    tid = {v: i for i, v in enumerate(values)}

    # Target.
    if kind == "regression":
        _check_finite(path, target, scan)
        if scan.not_number is not None:
            line, value = scan.not_number
            raise UserError(f"{path} line {line}: target {target!r} is {value!r}, not a number; a regression "
                            "target must be numeric (use --kind classification for labels)")
        classes: tuple[str, ...] = ()
    else:
        classes = tuple(sorted(scan.labels.index))
        if len(classes) < 2:
            raise UserError(f"classification needs at least 2 distinct values in {target!r}; it has "
                            f"{len(classes)}. Use --kind regression for a numeric target")
        if len(classes) > max(max_categories, 2) and all(_number(c) is not None for c in classes):
            raise UserError(f"target {target!r} has {len(classes)} distinct numeric values; that looks like "
                            "a regression target: pass --kind regression (or raise --max-categories)")

    # Features: numeric as they are, categorical one-hot over the categories seen in meta-train rows.
    late = [c for c in feats if c in scan.late]
    for cols in _kept_batches(batches, [task_column, *late], keep, scan.read, path) if late else ():
        tasks = scan.tasks.add(cols[task_column])
        for c in late:
            scan.pairs[c].add(tasks, scan.cats[c].add(cols[c], _missing(cols[c])))
    train_codes = np.array([scan.tasks.index[v] for v in split_values["train"]], dtype=np.int64)
    names, categories, col_of = [], {}, {}
    for c in feats:
        _check_finite(path, c, scan)
        col_of[c] = len(names)
        if scan.numeric[c]:
            names.append(c)
            continue
        seen = list(scan.cats[c].index)
        cats = sorted(seen[i] for i in scan.pairs.pop(c).values_in(train_codes))
        if len(cats) > max_categories:
            raise UserError(f"column {c!r} is categorical with {len(cats)} categories in the meta-train "
                            f"tasks, over the cap of {max_categories}; raise --max-categories, or leave it "
                            "out with --features (or encode it as numbers yourself)")
        categories[c] = cats
        names += [f"{c}={v}" for v in cats]

    # Second pass: every row's values written into place in x, y and task, allocated once.
    x = torch.zeros(scan.rows, len(names), dtype=torch.float64)
    y = torch.empty(scan.rows, dtype=torch.float64 if kind == "regression" else torch.int64)
    task_np = np.empty(scan.rows, dtype=np.int64)
    xs, ys = x.numpy(), y.numpy()
    ranks = {c: scan.cats[c].ranks(categories[c]) for c in categories}
    task_ranks = scan.tasks.ranks(values)
    label_ranks = scan.labels.ranks(list(classes))
    start = 0
    for cols in _kept_batches(batches, used, keep, scan.read, path):
        n = len(cols[task_column])
        rows = slice(start, start + n)
        task_np[rows] = scan.tasks.lookup(cols[task_column], task_ranks)
        if kind == "regression":
            ys[rows] = _numbers(cols[target], _missing(cols[target]))[0]
        else:
            ys[rows] = scan.labels.lookup(cols[target], label_ranks)
        for c in feats:
            if c in categories:  # a missing value is no category: its one-hot stays all zero
                pos = scan.cats[c].lookup(cols[c], ranks[c])
                hot = np.flatnonzero(pos >= 0)
                xs[start + hot, col_of[c] + pos[hot]] = 1.0
            else:
                xs[rows, col_of[c]] = _numbers(cols[c], _missing(cols[c]))[0]
        start += n
    if task_np.min() < 0 or (kind == "classification" and ys.min() < 0):
        raise UserError(f"{path} changed while it was read; run again once it is complete")
    if fill == "mean":
        train_mask = _rows_of(task_np, [tid[v] for v in split_values["train"]], len(values))
        for c in feats:
            if c in categories:
                continue
            col = xs[:, col_of[c]]
            absent = np.isnan(col)  # the numbers are finite (checked above): NaN is a missing value
            if absent.any():
                tr = col[train_mask & ~absent]
                col[absent] = tr.mean() if tr.size else 0.0
        del train_mask
    _release()

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
    mean, std = torch.empty(x.shape[1], dtype=x.dtype), torch.empty(x.shape[1], dtype=x.dtype)
    # Column by column into one buffer, by index_select: masked indexing of a column copies it several times.
    tr_rows = torch.from_numpy(np.flatnonzero(_rows_of(task_np, splits["train"], len(values))))
    rows = torch.empty(len(tr_rows), dtype=x.dtype)
    for k in range(x.shape[1]):
        torch.index_select(x[:, k], 0, tr_rows, out=rows)
        mean[k], std[k] = rows.mean(), rows.std(unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    if kind == "regression":
        torch.index_select(y, 0, tr_rows, out=rows)
        target_mean, target_std = rows.mean().item(), rows.std(unbiased=False).item() or 1.0
    else:
        target_mean, target_std = 0.0, 1.0
    del rows, tr_rows
    # Training runs in float32 on standardised values: every statistic must be finite and every value
    # representable there, or the run would train to "inf ± nan".
    big = torch.finfo(torch.float32).max
    too_big = [(n, x[:, k]) for k, n in enumerate(names)
               if not (mean[k].isfinite() and std[k].isfinite() and _largest(x[:, k]) <= big)]
    if kind == "regression" and not (math.isfinite(target_mean) and math.isfinite(target_std)
                                     and _largest(y) <= big):
        too_big.insert(0, (target, y))
    if too_big:
        n, col = too_big[0]
        raise UserError(f"{path}: column {n!r} holds values up to {_largest(col):.3g}, too large to "
                        f"standardise in float32 (max {big:.3g}); rescale it (e.g. divide by a power of 10)")
    return TabularData(x, y, task, tuple(values), tuple(names), categories, classes, kind, splits,
                       split_values, skipped, scan.dropped, mean, std, target_mean, target_std, tuple(header))


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
