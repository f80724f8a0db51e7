"""One table encoding: CSV files and rows of ``column -> value`` as tensors, and predictions back.

Used by the CSV task family (:mod:`mamlkit.tasks.tabular`, which adds the task split and episodes) and by
:mod:`mamlkit.use` (a user's support and query rows at adapt time), so both encode a row the same way:

* :func:`read_records` / :func:`read_rows`: THE CSV reader (header row first; ``,`` separated, quotes as
  Python's :mod:`csv`; blank lines skipped), bounded by :mod:`mamlkit.base.limits` (columns, cell length;
  a file read whole also its bytes and rows). A meta-training file is streamed instead, by pyarrow's
  columnar reader, with this reader as the fallback that names the line of every problem.
* :func:`encode_file`: a file's features ``x`` and targets ``y`` (the encoding fitted on the meta-train
  tasks the caller names), :func:`standardise`: the statistics that complete the :class:`TableSpec`.
* :func:`fit` (rows in memory -> :class:`TableSpec`), :func:`apply` (spec, rows -> ``x``),
  :func:`encode_targets` (labels or values -> the model's targets) and :func:`inverse_targets` (class
  ids -> labels, standardised outputs -> the target's units).

Missing values are empty cells and ``NA``, ``N/A``, ``NaN``, ``nan``, ``null``, ``None`` (:data:`MISSING`).
Feature columns whose every value parses as a number are numeric; the others are categorical, one-hot over
the categories seen in meta-train rows (sorted), at most ``max_categories``; an unseen category is all zeros
in training and an error at adapt time. A missing value under ``fill="mean"`` is the meta-train mean
(numeric) or an all-zero one-hot (categorical).
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.base.limits import (
    MAX_CELL_CHARS,
    MAX_TABLE_BYTES,
    MAX_TABLE_COLUMNS,
    MAX_TABLE_ROWS,
    LimitError,
    check_count,
)

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})
KINDS = ("regression", "classification")
FILLS = ("none", "drop", "mean")
FILE_HINT = " Pass the file with --path FILE."  # how a meta-training file is named
TASK = "\0task"  # the task column of rows fitted in memory: one task, a name no CSV header can hold


def is_missing(value: Any) -> bool:
    """A missing value: None, a float NaN, or a :data:`MISSING` spelling (any case, spaces around)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return str(value).strip().lower() in MISSING


def number(value: Any, finite: bool = True) -> float | None:
    """``float(value)``, or None when it is no number (or, with ``finite``, not a finite one)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if not finite or math.isfinite(v) else None


def read_records(path: Path, hint: str = "", *, whole: bool = False) -> Iterator:
    """The header (stripped names), then ``(row, line)`` for every data row, read one row at a time (blank
    lines skipped). Every problem (no file, not UTF-8, no header, duplicate names, a ragged line, no rows, a
    bound of :mod:`mamlkit.base.limits` passed) is a UserError naming its line. ``whole``: the caller holds
    every row, so the file's bytes and rows are bounded too."""
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}.{hint}")
    if whole:
        check_count(f"the size of {path} (bytes)", path.stat().st_size, MAX_TABLE_BYTES)
    rows = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = _header(path, next(reader, None))
            yield header
            for line, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue  # blank lines
                if len(row) != len(header):
                    raise UserError(f"{path} line {line} has {len(row)} fields, the header {len(header)}; fix the "
                                    "line (a missing comma or an unquoted comma inside a value)")
                rows += 1
                if whole:
                    check_count(f"the data rows of {path}", rows, MAX_TABLE_ROWS)
                yield row, line
    except csv.Error as e:
        if "field limit" in str(e):
            raise LimitError(f"{path} line {reader.line_num} holds a cell of more than {MAX_CELL_CHARS:,} "
                             "characters, the limit; shorten it (a missing closing quote makes the rest of the "
                             "file one cell)") from None
        raise UserError(f"cannot read {path} as a UTF-8 CSV file ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {path} as a UTF-8 CSV file ({e})") from None
    if not rows:
        raise UserError(f"{path} has a header but no data rows")


def _header(path: Path, first: list[str] | None) -> list[str]:
    if not first or not any(c.strip() for c in first):
        raise UserError(f"{path} is empty: the first line must hold the column names")
    check_count(f"the columns of {path}", len(first), MAX_TABLE_COLUMNS)
    header = [c.strip() for c in first]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise UserError(f"{path} has duplicate column names: {', '.join(dupes)}; rename them")
    return header


def read_rows(path: str | Path, hint: str = "") -> tuple[list[str], list[dict[str, str]], list[int]]:
    """``(columns, rows as column -> value, each row's line in the file)`` of a CSV read whole (bounded)."""
    records = read_records(Path(path), hint, whole=True)
    header = next(records)
    rows, lines = [], []
    for row, line in records:
        rows.append(dict(zip(header, row)))
        lines.append(line)
    return header, rows, lines


def overflow_cells(values: Tensor, dtype: torch.dtype) -> list[tuple[int, ...]]:
    """The positions of ``values`` that are finite as given but not once cast to ``dtype``, the model's
    (1e39, or a standardised 1e38, in float32): checked after the cast, where the model meets them."""
    bad = torch.isfinite(values) & ~torch.isfinite(values.to(dtype))
    return [tuple(i) for i in bad.nonzero().tolist()]


def beyond(dtype: torch.dtype) -> str:
    """How the message of a value beyond ``dtype``'s range ends."""
    name = str(dtype).removeprefix("torch.")
    return f"beyond the range of {name} (±{torch.finfo(dtype).max:.3g}), in which the model computes"


# --------------------------------------------------------------------------------------
# Streaming a file: the columnar reader, the row reader, and the first pass over the rows

class _Reread(Exception):
    """An error must name file lines, which the columnar reader does not track: read again, row by row."""


# A CSV task file is streamed in batches, never held whole: the memory in flight is a few MB whatever the file.
ARROW_BLOCK = 1 << 17  # bytes of the file per batch of the columnar reader (it reads up to 32 batches ahead)
RELEASE_ROWS = 1 << 17  # the Arrow memory pool gives freed memory back to the system every so many rows
ROW_BATCH = 1 << 14    # rows per batch of the row reader


def _arrow_header(path: Path) -> list[str] | None:
    """The header when the columnar reader can take the file from there; None leaves the file to the row
    reader, which names the problem."""
    records = read_records(path)
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
            # A column's bytes bound its longest cell: lengths are computed only where they could pass the bound.
            if any(batch.column(k).nbytes > MAX_CELL_CHARS
                   and (pc.max(pc.binary_length(batch.column(k))).as_py() or 0) > MAX_CELL_CHARS
                   for k in range(len(names))):
                raise _Reread  # the row reader names the line
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

    records = read_records(path, FILE_HINT)
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
        uniq = [number(v, finite=False) for v in enc.dictionary.to_pylist()]
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


def rows_of(task: np.ndarray, ids: list[int], num_tasks: int) -> np.ndarray:
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


# --------------------------------------------------------------------------------------
# The encoding


class Stats(NamedTuple):
    """Standardisation statistics over meta-train rows: ``mean``/``std`` ``[F]`` float64, and the regression
    target's (0 and 1 for classification)."""

    mean: Tensor
    std: Tensor
    target_mean: float
    target_std: float


@dataclass(frozen=True)
class TableSpec:
    """A fitted table encoding, JSON-serialisable (:meth:`to_json`; a checkpoint's model spec holds it as
    ``preprocess``, with the statistics as the ``Standardize`` layer's ``mean`` and ``std``).

    ``features``: the encoded names (a numeric column's own name; ``c=v`` per category ``v`` of a categorical
    column ``c``); ``categories``: column -> its meta-train categories, sorted; ``classes``: the sorted target
    labels (classification); ``mean``/``std``: per encoded feature over meta-train rows (a constant column has
    std 1); ``target_mean``/``target_std``: the regression target's; ``fill``: the missing-value rule.
    """

    features: tuple[str, ...]
    categories: dict[str, list[str]]
    classes: tuple[str, ...]
    kind: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    target_mean: float = 0.0
    target_std: float = 1.0
    fill: str = "none"

    def with_stats(self, stats: Stats) -> TableSpec:
        return replace(self, mean=tuple(stats.mean.tolist()), std=tuple(stats.std.tolist()),
                       target_mean=stats.target_mean, target_std=stats.target_std)

    def preprocess(self) -> dict[str, Any]:
        """The encoding as a checkpoint's model spec stores it (``preprocess``; the statistics of the features
        are the model's own ``mean`` and ``std``)."""
        return {"features": list(self.features), "categories": self.categories, "classes": list(self.classes),
                "kind": self.kind, "target_mean": self.target_mean, "target_std": self.target_std}

    def to_json(self) -> dict[str, Any]:
        """Everything, as JSON types: :meth:`from_json` gives the same spec back."""
        return {**self.preprocess(), "mean": list(self.mean), "std": list(self.std), "fill": self.fill}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> TableSpec:
        return cls(tuple(state["features"]), dict(state.get("categories", {})), tuple(state.get("classes", ())),
                   state["kind"], tuple(state.get("mean") or ()), tuple(state.get("std") or ()),
                   state.get("target_mean", 0.0), state.get("target_std", 1.0), state.get("fill", "none"))

    @classmethod
    def from_model_spec(cls, model_spec: dict[str, Any], fill: str = "none") -> TableSpec:
        """The spec a CSV-task checkpoint's model spec holds (``preprocess``, ``mean``, ``std``); the fill rule
        is in its input spec."""
        return cls.from_json({**model_spec["preprocess"], "mean": model_spec.get("mean"),
                              "std": model_spec.get("std"), "fill": fill})

    @property
    def columns(self) -> list[str]:
        """The raw columns behind the encoded features: a categorical column ``c`` with categories ``v1..vk``
        became the consecutive names ``c=v1 .. c=vk``, a numeric column its own name."""
        names, cols, i = list(self.features), [], 0
        while i < len(names):
            for c, vs in self.categories.items():
                if vs and names[i:i + len(vs)] == [f"{c}={v}" for v in vs]:
                    cols.append(c)
                    i += len(vs)
                    break
            else:
                cols.append(names[i])
                i += 1
        return cols


@dataclass(frozen=True, eq=False)
class EncodedTable:
    """A file's rows encoded: ``x [R, F]`` float64 (not standardised), ``y [R]`` float64 (regression) or int64
    class ids, ``task [R]`` int64 index into ``tasks`` (the sorted task values); ``spec`` without statistics
    (:func:`standardise`); ``dropped`` rows removed by ``fill="drop"``; the file's ``header``."""

    x: Tensor
    y: Tensor
    task: np.ndarray
    tasks: tuple[str, ...]
    spec: TableSpec
    dropped: int
    header: tuple[str, ...] = field(default=())


def encode_file(path: str | os.PathLike, task_column: str, target: str, features: tuple[str, ...] = (), *,
                kind: str = "regression", fill: str = "none", max_categories: int = 20,
                train_tasks: Callable[[list[str]], list[str]] = list) -> EncodedTable:
    """Read, check and encode a CSV of tasks. ``train_tasks(values)`` names, of the sorted task values, those
    whose rows fit the encoding (categories and ``fill="mean"`` means).

    The file is streamed twice in small batches (pyarrow's streaming reader), never held whole: the first pass
    finds the tasks, labels, column kinds and categories and every problem; the second writes each row's
    values into the preallocated ``x``, ``y`` and ``task``. When an error must name file lines, the passes
    are made by the row reader (:func:`read_records`) instead, which knows them. Raises
    :class:`~mamlkit.base.errors.UserError` naming the problem and the fix for every bad input.
    """
    path = Path(path).expanduser()
    if kind not in KINDS:
        raise UserError(f"kind must be regression or classification, got {kind!r}")
    if fill not in FILLS:
        raise UserError(f"fill must be none, drop or mean, got {fill!r}")
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}.{FILE_HINT}")
    args = (path, task_column, target, tuple(features), kind, fill, max_categories, train_tasks)
    header = _arrow_header(path)
    if header is not None:
        try:
            return _encode(header, functools.partial(_arrow_batches, path, header), *args)
        except _Reread:
            pass
        finally:
            _release()
    records = read_records(path, FILE_HINT)
    header = next(records)
    records.close()
    return _encode(header, functools.partial(_row_batches, path), *args)


def _encode(header: list[str], batches, path: Path, task_column: str, target: str, features: tuple[str, ...],
            kind: str, fill: str, max_categories: int, train_tasks: Callable[[list[str]], list[str]]
            ) -> EncodedTable:
    feats = _features(header, path, task_column, target, features)
    # First pass: tasks, labels, column kinds, categories and problems.
    used = list(dict.fromkeys([task_column, target, *feats]))
    scan = _Scan(task_column, target, feats, kind, fill)
    for cols, lines in batches(used):
        scan.add(cols, lines)
    _check_missing(scan, path)
    keep = scan.kept()
    values = sorted(scan.tasks.index)
    train = list(train_tasks(values))
    classes = _classes(scan, path, max_categories)
    categories = _categories(scan, batches, keep, path, train, max_categories)
    spec = TableSpec(tuple(_names(feats, categories)), categories, classes, kind, fill=fill)
    # Second pass: every row's values written into place in x, y and task, allocated once.
    x, y, task = _write(scan, batches, used, keep, path, spec, values)
    if fill == "mean":
        tid = {v: i for i, v in enumerate(values)}
        _fill_means(x.numpy(), rows_of(task, [tid[v] for v in train], len(values)), feats, categories)
    _release()
    return EncodedTable(x, y, task, tuple(values), spec, scan.dropped, tuple(header))


def _features(header: list[str], path: Path, task_column: str, target: str, features: tuple[str, ...]) -> list[str]:
    """The feature columns (``features``, default every column but the task and target), every name checked."""
    names_txt = ", ".join(c for c in header if c != TASK)
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
    return feats


def _check_missing(scan: _Scan, path: Path) -> None:
    if scan.missing.count:
        raise UserError(f"{path}: {scan.missing.count} row(s) have missing values (lines {scan.missing}; columns "
                        f"{', '.join(sorted(scan.missing_cols))}). Fix the file, or pass --fill drop (drop those "
                        "rows) or --fill mean (fill numeric features with their meta-train mean)")
    if scan.key_missing.count:
        raise UserError(f"{path}: {scan.key_missing.count} row(s) miss the task or target value (lines "
                        f"{scan.key_missing}); these cannot be filled: pass --fill drop")
    if not scan.rows:
        raise UserError(f"{path}: every row has a missing value; --fill drop leaves nothing")


def _classes(scan: _Scan, path: Path, max_categories: int) -> tuple[str, ...]:
    """The sorted labels of a classification target (none for regression), the target checked."""
    target = scan.target
    if scan.kind == "regression":
        _check_finite(path, target, scan)
        if scan.not_number is not None:
            line, value = scan.not_number
            raise UserError(f"{path} line {line}: target {target!r} is {value!r}, not a number; a regression "
                            "target must be numeric (use --kind classification for labels)")
        return ()
    classes = tuple(sorted(scan.labels.index))
    if len(classes) < 2:
        raise UserError(f"classification needs at least 2 distinct values in {target!r}; it has "
                        f"{len(classes)}. Use --kind regression for a numeric target")
    if len(classes) > max(max_categories, 2) and all(number(c) is not None for c in classes):
        raise UserError(f"target {target!r} has {len(classes)} distinct numeric values; that looks like "
                        "a regression target: pass --kind regression (or raise --max-categories)")
    return classes


def _categories(scan: _Scan, batches, keep: np.ndarray | None, path: Path, train: list[str],
                max_categories: int) -> dict[str, list[str]]:
    """Each categorical feature's categories: those seen in the rows of the ``train`` tasks, sorted."""
    late = [c for c in scan.feats if c in scan.late]
    task_column = scan.task_column
    for cols in _kept_batches(batches, [task_column, *late], keep, scan.read, path) if late else ():
        tasks = scan.tasks.add(cols[task_column])
        for c in late:
            scan.pairs[c].add(tasks, scan.cats[c].add(cols[c], _missing(cols[c])))
    train_codes = np.array([scan.tasks.index[v] for v in train], dtype=np.int64)
    categories = {}
    for c in scan.feats:
        _check_finite(path, c, scan)
        if scan.numeric[c]:
            continue
        seen = list(scan.cats[c].index)
        cats = sorted(seen[i] for i in scan.pairs.pop(c).values_in(train_codes))
        if len(cats) > max_categories:
            raise UserError(f"column {c!r} is categorical with {len(cats)} categories in the meta-train "
                            f"tasks, over the cap of {max_categories}; raise --max-categories, or leave it "
                            "out with --features (or encode it as numbers yourself)")
        categories[c] = cats
    return categories


def _names(feats: list[str], categories: dict[str, list[str]]) -> list[str]:
    """The encoded features: a numeric column's name, or ``c=v`` per category ``v`` of a categorical one."""
    return [n for c in feats for n in ([f"{c}={v}" for v in categories[c]] if c in categories else [c])]


def _write(scan: _Scan, batches, used: list[str], keep: np.ndarray | None, path: Path, spec: TableSpec,
           values: list[str]) -> tuple[Tensor, Tensor, np.ndarray]:
    """``(x, y, task)`` of the rows kept, each batch written into place."""
    x = torch.zeros(scan.rows, len(spec.features), dtype=torch.float64)
    y = torch.empty(scan.rows, dtype=torch.float64 if spec.kind == "regression" else torch.int64)
    task = np.empty(scan.rows, dtype=np.int64)
    xs, ys = x.numpy(), y.numpy()
    col_of = _offsets(scan.feats, spec.categories)
    ranks = {c: scan.cats[c].ranks(spec.categories[c]) for c in spec.categories}
    task_ranks = scan.tasks.ranks(values)
    label_ranks = scan.labels.ranks(list(spec.classes))
    start = 0
    for cols in _kept_batches(batches, used, keep, scan.read, path):
        n = len(cols[scan.task_column])
        rows = slice(start, start + n)
        task[rows] = scan.tasks.lookup(cols[scan.task_column], task_ranks)
        if spec.kind == "regression":
            ys[rows] = _numbers(cols[scan.target], _missing(cols[scan.target]))[0]
        else:
            ys[rows] = scan.labels.lookup(cols[scan.target], label_ranks)
        for c in scan.feats:
            if c in spec.categories:  # a missing value is no category: its one-hot stays all zero
                pos = scan.cats[c].lookup(cols[c], ranks[c])
                hot = np.flatnonzero(pos >= 0)
                xs[start + hot, col_of[c] + pos[hot]] = 1.0
            else:
                xs[rows, col_of[c]] = _numbers(cols[c], _missing(cols[c]))[0]
        start += n
    if task.min() < 0 or (spec.kind == "classification" and ys.min() < 0):
        raise UserError(f"{path} changed while it was read; run again once it is complete")
    return x, y, task


def _offsets(feats: list[str], categories: dict[str, list[str]]) -> dict[str, int]:
    """Each feature column's first encoded column."""
    widths = [len(categories[c]) if c in categories else 1 for c in feats]
    return dict(zip(feats, itertools.accumulate([0, *widths])))


def _fill_means(xs: np.ndarray, train_mask: np.ndarray, feats: list[str], categories: dict[str, list[str]]) -> None:
    """``fill="mean"``: a numeric feature's missing values (NaN) become its mean over the rows of ``train_mask``."""
    for c, k in _offsets(feats, categories).items():
        if c in categories:
            continue
        col = xs[:, k]
        absent = np.isnan(col)  # the numbers are finite (checked in the first pass): NaN is a missing value
        if absent.any():
            tr = col[train_mask & ~absent]
            col[absent] = tr.mean() if tr.size else 0.0


def standardise(x: Tensor, y: Tensor, train_rows: np.ndarray, spec: TableSpec, path: str | Path, target: str
                ) -> Stats:
    """Mean and standard deviation of every encoded feature over the rows of ``train_rows`` (a constant column
    gets std 1), and the regression target's. Training runs in float32 on standardised values: a statistic
    that is not finite, or a value beyond float32, is a UserError naming the column (it would train to
    "inf ± nan")."""
    mean, std = torch.empty(x.shape[1], dtype=x.dtype), torch.empty(x.shape[1], dtype=x.dtype)
    # Column by column into one buffer, by index_select: masked indexing of a column copies it several times.
    tr_rows = torch.from_numpy(np.flatnonzero(train_rows))
    rows = torch.empty(len(tr_rows), dtype=x.dtype)
    for k in range(x.shape[1]):
        torch.index_select(x[:, k], 0, tr_rows, out=rows)
        mean[k], std[k] = rows.mean(), rows.std(unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    if spec.kind == "regression":
        torch.index_select(y, 0, tr_rows, out=rows)
        target_mean, target_std = rows.mean().item(), rows.std(unbiased=False).item() or 1.0
    else:
        target_mean, target_std = 0.0, 1.0
    del rows, tr_rows
    big = torch.finfo(torch.float32).max
    too_big = [(n, x[:, k]) for k, n in enumerate(spec.features)
               if not (mean[k].isfinite() and std[k].isfinite() and _largest(x[:, k]) <= big)]
    if spec.kind == "regression" and not (math.isfinite(target_mean) and math.isfinite(target_std)
                                          and _largest(y) <= big):
        too_big.insert(0, (target, y))
    if too_big:
        n, col = too_big[0]
        raise UserError(f"{path}: column {n!r} holds values up to {_largest(col):.3g}, too large to "
                        f"standardise in float32 (max {big:.3g}); rescale it (e.g. divide by a power of 10)")
    return Stats(mean, std, target_mean, target_std)


def fit(rows: list[dict[str, Any]], target: str, features: tuple[str, ...] = (), *, kind: str = "regression",
        fill: str = "none", max_categories: int = 20) -> TableSpec:
    """The encoding of rows held in memory (``column -> value``; every row one task's), fitted and standardised
    on all of them by the same code as a file's (:func:`encode_file`): ``apply(fit(rows, ...), rows)`` is the
    encoding a meta-training file of these rows gets. ``features`` default to every column but ``target``."""
    import pyarrow as pa

    check_count("the rows to fit", len(rows), MAX_TABLE_ROWS)
    header = [TASK, *dict.fromkeys(k for r in rows for k in r)]
    where = Path("the rows")

    def batches(columns: list[str]) -> Iterator[tuple[dict, np.ndarray]]:
        cells = {c: ["one" if c == TASK else _cell(r.get(c)) for r in rows] for c in columns}
        yield {c: pa.array(v, pa.string()) for c, v in cells.items()}, np.arange(1, len(rows) + 1)

    table = _encode(header, batches, where, TASK, target, tuple(features), kind, fill, max_categories, list)
    stats = standardise(table.x, table.y, np.ones(len(table.y), dtype=bool), table.spec, where, target)
    return table.spec.with_stats(stats)


def _cell(value: Any) -> str:
    """A value of a row in memory as the text a CSV cell would hold (None and NaN: missing)."""
    return "" if is_missing(value) else str(value).strip()


def _first(values: list[int], limit: int = 10) -> str:
    """``"3, 7, 9"``: at most ``limit`` line numbers, then how many more."""
    return ", ".join(map(str, values[:limit])) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _place(rows: list, lines: list[int] | None) -> tuple[str, list[int]]:
    """How rows are named in messages: file lines, or rows of a Python list counted from 1."""
    return ("line", lines) if lines is not None else ("row", list(range(1, len(rows) + 1)))


class _Problems:
    """What :func:`apply` found wrong with rows, refused together once every column has been read."""

    def __init__(self) -> None:
        self.missing: dict[str, list[int]] = {}
        self.unknown: dict[str, dict[str, list[int]]] = {}
        self.not_numbers: list[str] = []

    def refuse(self, spec: TableSpec, where: str, label: str) -> None:
        if self.not_numbers:
            more = " ..." if len(self.not_numbers) > 5 else ""
            raise UserError(f"{where}: {'; '.join(self.not_numbers[:5])}{more}: not a number, but the model "
                            "learned this column as numeric")
        if self.unknown:
            parts = [f"column {c!r} has {', '.join(repr(v) for v in vs)} ({label}(s) "
                     f"{_first(sorted(n for ls in vs.values() for n in ls))}); it knows {', '.join(spec.categories[c])}"
                     for c, vs in self.unknown.items()]
            raise UserError(f"{where}: categories not seen in meta-training: {'; '.join(parts)}. Use one of the "
                            "known categories (the one-hot encoding was fixed at meta-training).")
        if self.missing and spec.fill != "mean":
            rows_with = sorted({n for ls in self.missing.values() for n in ls})
            raise UserError(f"{where}: {len(rows_with)} row(s) have missing values ({label}(s) {_first(rows_with)}; "
                            f"columns {', '.join(self.missing)}). Fill them in: this model was meta-trained with "
                            f"--fill {spec.fill}, so it has no rule for missing values.")


def apply(spec: TableSpec, rows: list[dict[str, Any]], *, where: str = "the input",
          lines: list[int] | None = None) -> Tensor:
    """Encode raw rows (``column -> value``) with a fitted encoding: ``x [n, F]`` float32, numeric columns as
    numbers, categorical ones one-hot over the spec's categories (not standardised: the model's
    ``Standardize`` layer does that). ``lines``: the rows' file lines, for messages.

    Missing values are an error naming lines and columns, except under ``fill="mean"``, where a numeric feature
    takes its meta-train mean and a categorical one stays all zero, as in training. A category unseen in
    meta-training is an error.
    """
    cols = spec.columns
    label, lines = _place(rows, lines)
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    lacking = [c for c in cols if c not in present]
    if lacking:
        raise UserError(f"{where} lacks the feature column(s) {', '.join(lacking)}; this model needs the columns "
                        f"{', '.join(cols)}")
    means = dict(zip(spec.features, spec.mean or [0.0] * len(spec.features)))
    out = torch.zeros(len(rows), len(spec.features), dtype=torch.float64)
    problems = _Problems()
    j = 0
    for c in cols:
        if c in spec.categories:
            _apply_categorical(out, j, c, spec.categories[c], rows, lines, problems)
            j += len(spec.categories[c])
        else:
            _apply_numeric(out, j, c, means[c], rows, lines, label, problems)
            j += 1
    problems.refuse(spec, where, label)
    cells = overflow_cells(out, torch.float32)  # finite in float64, where they were read, but not as inputs
    if cells:
        named = "; ".join(f"{label} {lines[i]} column {spec.features[j]!r} is {out[i, j].item():g}"
                          for i, j in cells[:5])
        raise UserError(f"{where}: {named}{' ...' if len(cells) > 5 else ''}: {beyond(torch.float32)}. Rescale "
                        "the column")
    return out.float()


def _apply_categorical(out: Tensor, j: int, c: str, categories: list[str], rows: list[dict[str, Any]],
                       lines: list[int], problems: _Problems) -> None:
    pos = {v: k for k, v in enumerate(categories)}
    for i, r in enumerate(rows):
        if is_missing(r[c]):
            problems.missing.setdefault(c, []).append(lines[i])
        elif str(r[c]).strip() in pos:
            out[i, j + pos[str(r[c]).strip()]] = 1.0
        else:
            problems.unknown.setdefault(c, {}).setdefault(str(r[c]).strip(), []).append(lines[i])


def _apply_numeric(out: Tensor, j: int, c: str, mean: float, rows: list[dict[str, Any]], lines: list[int],
                   label: str, problems: _Problems) -> None:
    for i, r in enumerate(rows):
        v = number(r[c])
        if is_missing(r[c]):
            problems.missing.setdefault(c, []).append(lines[i])
            v = mean
        elif v is None:
            problems.not_numbers.append(f"{label} {lines[i]} column {c!r} is {r[c]!r}")
            continue
        out[i, j] = v


def encode_targets(spec: TableSpec, values: list[Any], *, where: str = "the input",
                   lines: list[int] | None = None) -> Tensor:
    """Targets in the user's units as the model's: class ids ``[n]`` (int64) over the spec's classes, or
    standardised regression targets ``[n, 1]`` float32 (meta-train mean and std)."""
    label, lines = _place(values, lines)
    gaps = [n for v, n in zip(values, lines) if is_missing(v)]
    if gaps:
        raise UserError(f"{where}: the target is missing on {label}(s) {_first(gaps)}; every support row needs one")
    if spec.kind == "classification":
        ids = {c: i for i, c in enumerate(spec.classes)}
        bad = sorted({str(v).strip() for v in values} - set(ids))
        if bad:
            raise UserError(f"{where}: target value(s) {', '.join(map(repr, bad))} are not classes of this model; "
                            f"its classes are {', '.join(spec.classes)}")
        return torch.tensor([ids[str(v).strip()] for v in values])
    ys = [number(v) for v in values]
    bad = [f"{n} ({v!r})" for v, y, n in zip(values, ys, lines) if y is None]
    if bad:
        raise UserError(f"{where}: the regression target is not a number on {label}(s) {', '.join(bad[:5])}")
    y = (torch.tensor(ys, dtype=torch.float64)[:, None] - spec.target_mean) / spec.target_std
    cells = overflow_cells(y, torch.float32)  # standardised, a large target can leave float32's range
    if cells:
        named = ", ".join(f"{lines[i]} ({values[i]!r}, {y[i, 0].item():g} standardised)" for i, _ in cells[:5])
        raise UserError(f"{where}: the target on {label}(s) {named}{' ...' if len(cells) > 5 else ''} is "
                        f"{beyond(torch.float32)}, after standardising with the meta-train mean "
                        f"{spec.target_mean:g} and std {spec.target_std:g}. Rescale the target")
    return y.float()


def inverse_targets(spec: TableSpec, predicted: Tensor) -> Tensor | list[str]:
    """The model's targets back in the user's terms: class ids ``[n]`` -> their labels (classification), or
    standardised outputs ``[n, ...]`` -> ``values · σ + μ`` in the target's units (meta-train statistics)."""
    if spec.kind == "classification":
        return [spec.classes[int(i)] for i in predicted.reshape(-1)]
    return predicted * spec.target_std + spec.target_mean


__all__ = ["MISSING", "KINDS", "FILLS", "is_missing", "number", "read_records", "read_rows", "overflow_cells",
           "beyond", "rows_of", "Stats", "TableSpec", "EncodedTable", "encode_file", "standardise", "fit", "apply",
           "encode_targets", "inverse_targets"]
