"""The raw-input formats of ``mamlkit adapt`` and ``mamlkit.load(...).adapt``: a registry that task families
name in their ``input_spec(cfg)["type"]``.

A :class:`Format` serves the families of one kind (``classification`` or ``regression``) that declare its
type. ``read(learner, files)`` turns the support and query files of ``mamlkit adapt`` into the learner's
inputs (a :class:`Task`: support inputs and targets, query inputs, and how predictions become output rows,
labels or values); ``encode(input_spec, model_spec, x)``, where the format has raw inputs in Python
(utterances, rows), turns them into the model's input tensor. Registered here:

========== ============== ===================================================================================
type       kind           support / query
========== ============== ===================================================================================
image      classification one folder per class / image files and folders
text       classification a CSV of text,label rows / a text file (one utterance a line) or a CSV
vector     regression     a CSV of input columns then the target / a CSV of input columns
vector     classification a CSV of input columns then the label / a CSV of input columns
table      both           a CSV of the model's feature columns and its target / a CSV of the feature columns
========== ============== ===================================================================================

A new format is one :func:`register_format` call; a family of a kind no format of its type serves is
refused by ``mamlkit adapt`` with a message naming the formats there are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.data import tables
from mamlkit.use import inputs
from mamlkit.use import io as mio

KINDS = ("classification", "regression")


@dataclass(frozen=True)
class Files:
    """What ``mamlkit adapt`` was given: the support file or folder, the query files, the CSV columns named by
    flags, and the checkpoint's name for messages."""

    support: str | Path
    query: list[str]
    checkpoint: str = "the checkpoint"
    text_column: str = "text"
    label_column: str = "label"
    id_column: str | None = None


@dataclass
class Task:
    """A task read for adapting: ``support_x``/``support_y`` and ``query_x`` as ``Learner.adapt`` and
    ``TaskModel.predict`` take them, ``class_names`` (support labels numbered in this order), ``support`` and
    ``classes`` for the summary line, ``notes`` to print, and ``rows(prediction)``: the output rows."""

    support_x: Any
    support_y: Any
    query_x: Any
    support: str
    queries: int
    rows: Callable[[Any], list[dict]]
    class_names: list[str] | None = None
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Format:
    """A raw-input format: its ``type`` (``input_spec(cfg)["type"]``), the ``kind`` of family it serves, how
    ``mamlkit adapt`` reads its files (``read(learner, files) -> Task``) and, for raw inputs in Python,
    ``encode(input_spec, model_spec, x) -> Tensor`` (None: tensors only) with ``accepts``, what to pass."""

    type: str
    kind: str
    read: Callable[[Any, Files], Task]
    encode: Callable[[dict[str, Any], dict[str, Any], list], Tensor] | None = None
    accepts: str = "a tensor"


FORMATS: dict[tuple[str, str], Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the registry, under its type and kind."""
    if fmt.kind not in KINDS:
        raise ValueError(f"a format serves classification or regression families, not {fmt.kind!r}")
    FORMATS[fmt.type, fmt.kind] = fmt
    return fmt


def lookup(spec: dict[str, Any] | None, kind: str, where: str = "this checkpoint") -> Format:
    """The format of an input spec for a learner of ``kind``; a UserError when no format serves them."""
    if spec is None:
        raise UserError(f"{where}'s task family declares no raw input format, so its raw inputs cannot be read. "
                        "Adapt it from Python with tensors: mamlkit.load(CHECKPOINT).adapt(support_x, support_y)")
    fmt = FORMATS.get((spec.get("type"), kind))
    if fmt is None:
        served = ", ".join(f"{t} ({k})" for t, k in sorted(FORMATS))
        raise UserError(f"{where} takes inputs of type {spec.get('type')!r} for {kind}, which this version of "
                        f"mamlkit cannot read (formats: {served}); adapt it from Python with tensors")
    return fmt


# --------------------------------------------------------------------------------------
# Output rows


def _labelled(names: list[str], key: str, keys: list[Any]) -> Callable[[Any], list[dict]]:
    """Rows ``{key: ..., prediction: label, p[label]: probability ...}`` of a classification prediction."""
    def rows(pred) -> list[dict]:
        return [{key: k, "prediction": names[int(label)], **{f"p[{n}]": round(float(p), 6)
                                                            for n, p in zip(names, probs)}}
                for k, label, probs in zip(keys, pred.labels, pred.probs)]
    return rows


def _ids(files: Files, rows: list[dict]) -> list[dict]:
    """The id column's value per query row (``--id-column``, else a column named ``id``), or nothing."""
    column = files.id_column or ("id" if rows and "id" in rows[0] else None)
    if column is None:
        return [{} for _ in rows]
    if rows and column not in rows[0]:
        raise UserError(f"--id-column {column!r} is not a column of {files.query[0]}; its columns are "
                        f"{', '.join(rows[0]) or '(a plain text file has none)'}")
    return [{column: r[column]} for r in rows]


def _one_query(files: Files, what: str) -> str:
    if len(files.query) != 1:
        raise UserError(f"a {what} checkpoint takes one query {'file' if what == 'text' else 'CSV'}"
                        + (" (a text file, one utterance per line, or a CSV)" if what == "text" else ""))
    return files.query[0]


# --------------------------------------------------------------------------------------
# The formats


def read_images(learner, files: Files) -> Task:
    """Support: a folder with one sub-folder of images per class; query: image files and folders."""
    spec = learner.input
    sx, sy, names, notes = mio.load_image_folder(files.support, spec)
    qx, paths, qnotes = mio.load_query_images(files.query, spec)
    notes = sorted(notes | qnotes)
    if learner.n_way and len(names) < learner.n_way:
        notes.append(f"{len(names)} classes, the model's head has {learner.n_way} outputs; using the first "
                     f"{len(names)}")
    return Task(sx, sy, qx, f"{len(sy)} support images", len(paths),
                _labelled(names, "file", [str(f) for f in paths]), names, names, notes)


def read_text(learner, files: Files) -> Task:
    """Support: a CSV of (text, label) rows; query: a text file (one utterance a line) or a CSV."""
    texts, labels = inputs.read_text_support(files.support, files.text_column, files.label_column)
    names = sorted(set(labels))
    if len(names) < 2:
        raise UserError(f"{files.support} has a single label ({names[0]!r}); a few-shot task needs at least 2 "
                        "classes")
    qtexts, qrows = inputs.read_text_query(_one_query(files, "text"), files.text_column)
    ids = _ids(files, qrows)
    labelled = _labelled(names, "text", qtexts)

    def rows(pred) -> list[dict]:
        return [{"row": i, **ids[i], **r} for i, r in enumerate(labelled(pred))]
    return Task(texts, labels, qtexts, f"{len(texts)} support utterances", len(qtexts), rows, names, names)


def read_vectors(learner, files: Files) -> Task:
    """Support: a CSV of input columns then the target (regression) or label (classification); query: a CSV
    of the input columns. The column count is the checkpoint's recorded input width."""
    classify = learner.kind == "classification"
    width = _in_features(learner.input, files.checkpoint)
    query = _one_query(files, "classification" if classify else "regression")
    dtype = next(learner.meta.model.parameters()).dtype  # values must be finite in the model's dtype
    sx, sy = mio.load_vector_csv(files.support, width, target="label" if classify else "value", dtype=dtype)
    qx, _ = mio.load_vector_csv(query, width, target=None, dtype=dtype)
    keys = [{f"x{i}": float(v) for i, v in enumerate(x)} for x in qx]
    if classify:
        names = sorted(set(sy))
        labelled = _labelled(names, "x", keys)

        def rows(pred) -> list[dict]:
            return [{**r.pop("x"), **r} for r in labelled(pred)]
        return Task(sx, sy, qx, f"{len(sy)} support points", len(qx), rows, names, names)

    def values(pred) -> list[dict]:
        return [{**k, "prediction": float(y.reshape(-1)[0])} for k, y in zip(keys, pred.values)]
    return Task(sx, sy, qx, f"{len(sy)} support points", len(qx), values)


def _in_features(spec: dict, checkpoint: str) -> int:
    """The input columns of a vector checkpoint: its recorded input width (written at training time, else
    its task family's), never a guess from the model's weights (an embedding or a FiLM table may come first)."""
    from mamlkit.base.limits import MAX_WIDTH

    width = spec.get("features")
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise UserError(f"{checkpoint} does not record how many input columns its model takes (its input spec is "
                        f"{spec}), so `mamlkit adapt` cannot read a CSV for it. Adapt it from Python with tensors: "
                        "mamlkit.load(CHECKPOINT).adapt(support_x, support_y)")
    if spec.get("tokens"):
        raise UserError(f"{checkpoint} takes token ids, which `mamlkit adapt` does not read from a CSV of values; "
                        "adapt it from Python with tensors: mamlkit.load(CHECKPOINT).adapt(support_x, support_y)")
    return width


def read_table(learner, files: Files) -> Task:
    """Support: a CSV of the model's feature columns and its target; query: a CSV of the feature columns. Rows
    are encoded with the checkpoint's meta-train encoding (:mod:`mamlkit.data.tables`); targets stay in the
    user's units (the learner standardises them) and predictions come back in them."""
    spec = table_spec(learner.input, learner.model_spec)
    target = learner.input["target"]
    query = _one_query(files, "CSV-task")
    header, rows, lines = tables.read_rows(files.support)
    if target not in header:
        raise UserError(f"{files.support} has no target column {target!r}; the support CSV needs the feature "
                        f"columns ({', '.join(spec.columns)}) and the target {target!r}. Its columns are "
                        f"{', '.join(header)}")
    sx = tables.apply(spec, rows, where=str(files.support), lines=lines)
    targets = [r[target] for r in rows]
    tables.encode_targets(spec, targets, where=str(files.support), lines=lines)  # errors name lines
    _, qrows, qlines = tables.read_rows(query)
    qx = tables.apply(spec, qrows, where=str(query), lines=qlines)
    ids = _ids(files, qrows)
    if spec.kind == "classification":
        labelled = _labelled(list(spec.classes), "row", list(range(len(qrows))))

        def out(pred) -> list[dict]:
            return [{"row": i, **ids[i], **{k: v for k, v in r.items() if k != "row"}}
                    for i, r in enumerate(labelled(pred))]
        return Task(sx, targets, qx, f"{len(targets)} support rows", len(qrows), out,
                    classes=sorted({str(t) for t in targets}))

    def values(pred) -> list[dict]:
        return [{"row": i, **ids[i], "prediction": float(v.reshape(-1)[0])} for i, v in enumerate(pred.values)]
    return Task(sx, targets, qx, f"{len(targets)} support rows", len(qrows), values)


def table_spec(input_spec: dict[str, Any], model_spec: dict[str, Any]) -> tables.TableSpec:
    """The table encoding a CSV-task checkpoint holds: its model spec's, with its input spec's fill rule."""
    return tables.TableSpec.from_model_spec(model_spec, input_spec.get("fill", "none"))


def _encode_rows(input_spec: dict[str, Any], model_spec: dict[str, Any], rows: list) -> Tensor:
    return tables.apply(table_spec(input_spec, model_spec), list(rows))


def _encode_texts(input_spec: dict[str, Any], model_spec: dict[str, Any], texts: list) -> Tensor:
    return inputs.encode_texts(list(texts), input_spec)


register_format(Format("image", "classification", read_images))
register_format(Format("text", "classification", read_text, _encode_texts, "a tensor or a list of strings"))
register_format(Format("vector", "regression", read_vectors))
register_format(Format("vector", "classification", read_vectors))
for _kind in KINDS:
    register_format(Format("table", _kind, read_table, _encode_rows, "a tensor or a list of row dicts"))


def model_input(spec: dict[str, Any] | None, kind: str, model_spec: dict[str, Any], x: Any) -> Tensor:
    """``x`` as the model's input tensor: raw inputs (utterances, row dicts) encoded by the spec's format; a
    tensor is taken as already encoded."""
    if isinstance(x, Tensor):
        return x
    if spec is None:
        raise UserError(f"this checkpoint's task family declares no raw input format: pass tensors, not a "
                        f"{type(x).__name__}")
    fmt = FORMATS.get((spec.get("type"), kind))
    accepts = fmt.accepts if fmt else "a tensor"
    if fmt is None or fmt.encode is None or isinstance(x, str) or not isinstance(x, (list, tuple)):
        raise UserError(f"this checkpoint's inputs are {spec.get('type')}s: pass {accepts}, "
                        f"not a {type(x).__name__}")
    return fmt.encode(spec, model_spec, x)


def is_table(spec: dict[str, Any] | None) -> bool:
    """Whether raw inputs are table rows, whose targets are in the user's units (standardised by the spec)."""
    return isinstance(spec, dict) and spec.get("type") == "table"


__all__ = ["Files", "Task", "Format", "FORMATS", "register_format", "lookup", "model_input", "table_spec",
           "is_table", "read_images", "read_text", "read_vectors", "read_table"]
