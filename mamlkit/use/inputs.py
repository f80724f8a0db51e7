"""Raw inputs of text and CSV-task checkpoints as model inputs, and the files `mamlkit adapt` reads for them.

* Text (task ``clinc``): utterances are encoded with the checkpoint's own encoder recipe
  (:mod:`mamlkit.data.encoders`): ``frozen`` gives the sentence embedding ``[384]``; ``finetune`` the hidden
  states entering the adapted layers, ``[max_tokens, 385]``, rounded through float16 exactly as the
  training cache stores them, so an utterance meets the model as it did in meta-training.
* CSV tasks (task ``csv``): rows are encoded with the meta-train encoding stored in the checkpoint's
  model spec (``preprocess``: feature names, one-hot categories, classes, target mean and std); the
  feature standardisation itself is a layer of the model.

Every problem with the input is a :class:`~mamlkit.base.errors.UserError` naming the file, the lines or
columns, and the fix (the CLI exits with code 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.tasks.tabular import (
    MISSING,  # the same missing-value spellings as in training
    read_csv_table,
)
from mamlkit.use.io import beyond, overflow_cells


def encode_texts(texts: list[str], spec: dict[str, Any]) -> Tensor:
    """Utterances as the text model's inputs: ``[n, 384]`` (frozen) or ``[n, max_tokens, 385]`` (finetune)."""
    from mamlkit.data import encoders

    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise UserError(f"text inputs must be non-empty strings; item(s) {bad[:10]} are not")
    if spec.get("mode") == "finetune":
        _, hidden = encoders.encode(list(texts), hidden_layer=int(spec["hidden_layer"]),
                                    pad_to=int(spec["max_tokens"]))
        return hidden.half().float()  # the training cache holds float16: the same numbers here
    return encoders.encode(list(texts))


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return str(value).strip().lower() in MISSING


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def feature_columns(pre: dict[str, Any]) -> list[str]:
    """The raw CSV columns behind the encoded feature names: a categorical column ``c`` with meta-train
    categories ``v1..vk`` became the consecutive names ``c=v1 .. c=vk``, a numeric column its own name."""
    names, cats, cols, i = pre["features"], pre.get("categories", {}), [], 0
    while i < len(names):
        for c, vs in cats.items():
            if vs and names[i:i + len(vs)] == [f"{c}={v}" for v in vs]:
                cols.append(c)
                i += len(vs)
                break
        else:
            cols.append(names[i])
            i += 1
    return cols


def encode_rows(rows: list[dict[str, Any]], model_spec: dict[str, Any], *, fill: str = "none",
                where: str = "the input", lines: list[int] | None = None) -> Tensor:
    """Encode raw rows (``column -> value``) with the checkpoint's meta-train encoding: ``x [n, F]``
    float32, numeric columns as numbers, categorical ones one-hot over the stored categories (not yet
    standardised: the model's ``Standardize`` layer does that).

    Missing values are an error naming lines and columns, except that with ``fill="mean"`` (the
    model was trained with ``--fill mean``) a numeric feature takes its meta-train mean and a
    categorical one stays all zero, as in training. A category unseen in meta-training is an error.
    """
    pre = model_spec["preprocess"]
    cats = pre.get("categories", {})
    cols = feature_columns(pre)
    label = "line" if lines is not None else "row"  # file line numbers, or rows of a Python list (from 1)
    lines = lines if lines is not None else list(range(1, len(rows) + 1))
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    lacking = [c for c in cols if c not in present]
    if lacking:
        raise UserError(f"{where} lacks the feature column(s) {', '.join(lacking)}; this model needs the columns "
                        f"{', '.join(cols)}")
    means = dict(zip(pre["features"], model_spec.get("mean") or [0.0] * len(pre["features"])))
    out = torch.zeros(len(rows), len(pre["features"]), dtype=torch.float64)
    missing: dict[str, list[int]] = {}
    unknown: dict[str, dict[str, list[int]]] = {}
    not_numbers: list[str] = []
    j = 0
    for c in cols:
        if c in cats:
            pos = {v: k for k, v in enumerate(cats[c])}
            for i, r in enumerate(rows):
                if _is_missing(r[c]):
                    missing.setdefault(c, []).append(lines[i])
                elif str(r[c]).strip() in pos:
                    out[i, j + pos[str(r[c]).strip()]] = 1.0
                else:
                    unknown.setdefault(c, {}).setdefault(str(r[c]).strip(), []).append(lines[i])
            j += len(cats[c])
        else:
            for i, r in enumerate(rows):
                v = _number(r[c])
                if _is_missing(r[c]):
                    missing.setdefault(c, []).append(lines[i])
                    v = means[c]
                elif v is None:
                    not_numbers.append(f"{label} {lines[i]} column {c!r} is {r[c]!r}")
                    continue
                out[i, j] = v
            j += 1
    if not_numbers:
        raise UserError(f"{where}: {'; '.join(not_numbers[:5])}{' ...' if len(not_numbers) > 5 else ''}: "
                        "not a number, but the model learned this column as numeric")
    if unknown:
        parts = [f"column {c!r} has {', '.join(repr(v) for v in vs)} ({label}(s) "
                 f"{_first(sorted(n for ls in vs.values() for n in ls))}); it knows {', '.join(cats[c])}"
                 for c, vs in unknown.items()]
        raise UserError(f"{where}: categories not seen in meta-training: {'; '.join(parts)}. Use one of the "
                        "known categories (the one-hot encoding was fixed at meta-training).")
    if missing and fill != "mean":
        rows_with = sorted({n for ls in missing.values() for n in ls})
        raise UserError(f"{where}: {len(rows_with)} row(s) have missing values ({label}(s) {_first(rows_with)}; "
                        f"columns {', '.join(missing)}). Fill them in: this model was meta-trained with --fill "
                        f"{fill}, so it has no rule for missing values.")
    cells = overflow_cells(out, torch.float32)  # finite in float64, where they were read, but not as inputs
    if cells:
        named = "; ".join(f"{label} {lines[i]} column {pre['features'][j]!r} is {out[i, j].item():g}"
                          for i, j in cells[:5])
        raise UserError(f"{where}: {named}{' ...' if len(cells) > 5 else ''}: {beyond(torch.float32)}. Rescale "
                        "the column")
    return out.float()


def _first(values: list[int], limit: int = 10) -> str:
    """``"3, 7, 9"``: at most ``limit`` line numbers, then how many more."""
    return ", ".join(map(str, values[:limit])) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def encode_targets(values: list[Any], model_spec: dict[str, Any], *, where: str = "the input",
                   lines: list[int] | None = None) -> Tensor:
    """Targets in the user's units as the model's: class ids ``[n]`` (int64) over the stored classes, or
    standardised regression targets ``[n, 1]`` (meta-train mean and std)."""
    pre = model_spec["preprocess"]
    label = "line" if lines is not None else "row"
    lines = lines if lines is not None else list(range(1, len(values) + 1))
    gaps = [n for v, n in zip(values, lines) if _is_missing(v)]
    if gaps:
        raise UserError(f"{where}: the target is missing on {label}(s) {_first(gaps)}; every support row needs one")
    if pre["kind"] == "classification":
        ids = {c: i for i, c in enumerate(pre["classes"])}
        bad = sorted({str(v).strip() for v in values} - set(ids))
        if bad:
            raise UserError(f"{where}: target value(s) {', '.join(map(repr, bad))} are not classes of this model; "
                            f"its classes are {', '.join(pre['classes'])}")
        return torch.tensor([ids[str(v).strip()] for v in values])
    ys = [_number(v) for v in values]
    bad = [f"{n} ({v!r})" for v, y, n in zip(values, ys, lines) if y is None]
    if bad:
        raise UserError(f"{where}: the regression target is not a number on {label}(s) {', '.join(bad[:5])}")
    y = (torch.tensor(ys, dtype=torch.float64)[:, None] - pre["target_mean"]) / pre["target_std"]
    cells = overflow_cells(y, torch.float32)  # standardised, a large target can leave float32's range
    if cells:
        named = ", ".join(f"{lines[i]} ({values[i]!r}, {y[i, 0].item():g} standardised)" for i, _ in cells[:5])
        raise UserError(f"{where}: the target on {label}(s) {named}{' ...' if len(cells) > 5 else ''} is "
                        f"{beyond(torch.float32)}, after standardising with the meta-train mean "
                        f"{pre['target_mean']:g} and std {pre['target_std']:g}. Rescale the target")
    return y.float()


def destandardise(values: Tensor, model_spec: dict[str, Any]) -> Tensor:
    """Regression outputs back in the target's units: ``values · σ + μ`` (meta-train statistics)."""
    pre = model_spec["preprocess"]
    return values * pre["target_std"] + pre["target_mean"]


# --------------------------------------------------------------------------------------
# Files for `mamlkit adapt`


def read_csv_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """``(columns, rows as dicts, file line numbers)`` of a CSV with a header row."""
    header, body = read_csv_table(Path(path), hint="")
    return header, [dict(zip(header, r[:-1])) for r in body], [int(r[-1]) for r in body]


def _column(path, header: list[str], name: str, flag: str, what: str) -> None:
    if name not in header:
        raise UserError(f"{path} has no column {name!r} ({what}); its columns are {', '.join(header)}. Rename the "
                        f"column or pass {flag} NAME")


def read_text_support(path: str | Path, text_column: str = "text", label_column: str = "label"
                      ) -> tuple[list[str], list[str]]:
    """A support CSV of (text, label) rows: ``(texts, labels)``; empty texts or labels are errors."""
    header, rows, lines = read_csv_rows(path)
    _column(path, header, text_column, "--text-column", "the utterances")
    _column(path, header, label_column, "--label-column", "the class labels")
    empty = [n for r, n in zip(rows, lines) if not r[text_column].strip() or not r[label_column].strip()]
    if empty:
        raise UserError(f"{path}: empty text or label on line(s) {_first(empty)}; every support row needs both")
    return [r[text_column].strip() for r in rows], [r[label_column].strip() for r in rows]


def read_text_query(path: str | Path, text_column: str = "text") -> tuple[list[str], list[dict[str, str]]]:
    """Query utterances from a ``.csv`` (its ``text_column``) or a plain text file (one per line, blank lines
    skipped): ``(texts, rows)`` where ``rows`` are the CSV rows (empty dicts for a text file)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        header, rows, lines = read_csv_rows(path)
        _column(path, header, text_column, "--text-column", "the utterances")
        empty = [n for r, n in zip(rows, lines) if not r[text_column].strip()]
        if empty:
            raise UserError(f"{path}: empty text on line(s) {_first(empty)}")
        return [r[text_column].strip() for r in rows], rows
    if not path.is_file():
        raise UserError(f"query file not found: {path}")
    try:
        texts = [t.strip() for t in path.read_text(encoding="utf-8-sig").splitlines() if t.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {path} as UTF-8 text ({e}); pass a text file with one utterance per "
                        "line, or a CSV with a text column") from None
    if not texts:
        raise UserError(f"{path} holds no utterances; put one per line")
    return texts, [{} for _ in texts]


__all__ = ["encode_texts", "feature_columns", "encode_rows", "encode_targets", "destandardise",
           "read_csv_rows", "read_text_support", "read_text_query"]
