"""``mamlkit adapt CHECKPOINT --support ... --query ...``: adapt a meta-trained model to your task."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from mamlkit.base.errors import UserError
from mamlkit.flags import add_threads_flag


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="adapt a meta-trained model to your own few examples and predict",
                       description="Adapt a checkpoint to a support set and predict the query set. Images: "
                       "--support is a folder with one sub-folder per class (any size or format); --query is "
                       "files and/or folders. Text (clinc checkpoints): --support is a CSV of text,label rows; "
                       "--query a text file (one utterance per line) or a CSV with a text column. CSV tasks "
                       "(csv checkpoints): --support is a CSV with the model's feature columns and its target; "
                       "--query a CSV with the feature columns. Regression: --support is a CSV of inputs then "
                       "target, --query a CSV of inputs.")
    p.add_argument("checkpoint", help="run folder or checkpoint file written by `mamlkit train`, or the name of "
                   "a model that ships with mamlkit (omniglot-5w1s, clinc-5w1s)")
    p.add_argument("--support", required=True, help="class folders (images) or a CSV (text, CSV tasks, regression)")
    p.add_argument("--query", required=True, nargs="+",
                   help="query images/folders, a text file (text) or a CSV (text, CSV tasks, regression)")
    p.add_argument("--steps", type=int, help="inner steps (default: the checkpoint's test-time steps)")
    p.add_argument("--output", help="write predictions to .csv or .json (default: CSV on stdout)")
    p.add_argument("--reset-head", action="store_true",
                   help="with more classes than the head has outputs: adapt a zero-initialised head of the right size")
    p.add_argument("--text-column", default="text", help="text checkpoints: the CSV column of utterances")
    p.add_argument("--label-column", default="label", help="text checkpoints: the support CSV's label column")
    add_model_flags(p)
    add_threads_flag(p, "default: the run's --threads")
    p.add_argument("--id-column", help="text and CSV-task checkpoints: a query CSV column copied to the output "
                   "(default: the column 'id' if there is one; the output always has the query row index)")


def import_from_here(model: str | None) -> None:
    """Import the module of ``model`` when it names a user's factory (``package.module:fn``, named on this
    command line; a name that can never be a factory is refused first) with the current folder first on
    ``sys.path``, so ``--model mynets:wide`` finds ``mynets.py`` where the command runs, as ``python -m`` would;
    the ``mamlkit`` script alone does not look there. The folder is on the path only while that module
    imports: nothing else mamlkit imports later can come from it. A module that still cannot be imported is
    left to the factory's own import, whose error names it."""
    import importlib

    from mamlkit.loop import train

    factory = train.named_factory(model) if model else None
    if factory is None:
        return
    module = factory.partition(":")[0]
    if module in sys.modules:
        return
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        importlib.import_module(module)
    except ImportError:
        pass
    finally:
        if sys.path and sys.path[0] == here:
            del sys.path[0]
        elif here in sys.path:  # the module itself put something before it
            sys.path.remove(here)


def add_trust_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--trust-model-code", action="store_true", help=what + "; mamlkit imports no code "
                        "because a file names it")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--trust-model-code`` of a command that loads a checkpoint of a user's model factory."""
    parser.add_argument("--model", metavar="PACKAGE.MODULE:FN", help="the model factory a checkpoint of your own "
                        "model was trained with: naming it allows mamlkit to import it")
    add_trust_flag(parser, "import the model factory the checkpoint names, whatever it is")


def add_example_parser(sub) -> None:
    p = sub.add_parser("example", help="copy an example task that ships with mamlkit into a folder",
                       description="Copy a tiny example task to try `mamlkit adapt`: omniglot (support/ and "
                       "query/ image folders), clinc (support.csv and query.txt), csv (a table of tasks to "
                       "meta-train on, and a new task's support and query CSVs).")
    p.add_argument("name", help="example name: omniglot, clinc or csv")
    p.add_argument("dest", help="folder to create")


def run_example(args: argparse.Namespace) -> int:
    from mamlkit.use.api import EXAMPLES

    if args.name not in EXAMPLES:
        raise UserError(f"unknown example {args.name!r}; available: {', '.join(EXAMPLES)}")
    dest = Path(args.dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file; `mamlkit example` copies a folder of files: name a new folder")
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} exists and is not empty; choose a new folder")
    _copy_folder(EXAMPLES[args.name], dest)
    print(f"example task in {dest}: {EXAMPLE_FILES[args.name].format(dest=dest)}")
    return 0


def _copy_folder(source, dest: Path) -> None:
    """Copy the folder ``source`` to ``dest`` (missing or empty) whole or not at all: into a temporary
    sibling first, renamed to ``dest`` once complete, so a full disk leaves no half-copied example."""
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        for path in sorted(Path(source).rglob("*")):  # file by file: shutil.copytree hides the errno in a list
            target = Path(tmp) / path.relative_to(source)
            if path.is_dir():
                target.mkdir()
            else:
                shutil.copyfile(path, target)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes a 0700 folder; give the usual permissions
        os.replace(tmp, dest)  # over a missing or empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


EXAMPLE_FILES = {
    "omniglot": "{dest}/support (one folder per class), {dest}/query",
    "clinc": "{dest}/support.csv (text,label rows: 5 new intents), {dest}/query.txt (one utterance per line); "
             "try `mamlkit adapt clinc-5w1s --support {dest}/support.csv --query {dest}/query.txt`",
    "csv": "{dest}/stores.csv (synthetic daily sales of 30 stores: meta-train with `mamlkit train csv --path "
           "{dest}/stores.csv --task-column store --target sales`), {dest}/new_store_support.csv and "
           "{dest}/new_store_query.csv (a new store: adapt on its 6 days, predict 4 more)",
}


def run(args: argparse.Namespace) -> int:
    from mamlkit.use import api

    if args.steps is not None and args.steps < 0:
        raise UserError("--steps must be >= 0")
    if args.steps is not None:  # before the checkpoint is read: the bound does not depend on it
        from mamlkit.base.limits import MAX_STEPS, check_count

        check_count("--steps", args.steps, MAX_STEPS)
    _check_output(args.output)
    import_from_here(args.model)  # --model mynets:wide finds mynets.py in the current folder
    learner = api.load(args.checkpoint, model=args.model, trust_model_code=args.trust_model_code)
    if not isinstance(learner, api.Learner):
        raise UserError(f"{args.checkpoint} is an already adapted model; `mamlkit adapt` needs a training checkpoint")
    with learner.meta.executor.planned(args.threads):  # the trainer's thread plan; the caller's settings after
        rows = _adapt(learner, args)
    _write(rows, args.output)
    return 0


def _adapt(learner, args: argparse.Namespace) -> list[dict]:
    """Read the support and query files in the checkpoint's input format, adapt and predict: output rows."""
    from mamlkit.use import io as mio

    spec = learner.input
    if spec is None:
        raise UserError(f"{args.checkpoint} is a {learner.cfg.task!r} checkpoint, and that task family declares no "
                        "raw input format, so `mamlkit adapt` cannot read files for it. Adapt it from Python with "
                        "tensors: mamlkit.load(CHECKPOINT).adapt(support_x, support_y)")
    kind = spec.get("type")
    if kind == "image":
        sx, sy, names, notes = mio.load_image_folder(args.support, spec)
        qx, files, qnotes = mio.load_query_images(args.query, spec)
        for note in sorted(notes | qnotes):
            print(f"mamlkit: note: {note}", file=sys.stderr)
        if learner.n_way and len(names) < learner.n_way:
            print(f"mamlkit: note: {len(names)} classes, the model's head has {learner.n_way} outputs; "
                  f"using the first {len(names)}", file=sys.stderr)
        task_model = learner.adapt(sx, sy, args.steps, reset_head=args.reset_head, class_names=names)
        _summary(learner, args, f"{len(sy)} support images", names, len(files))
        pred = task_model.predict(qx)
        rows = [{"file": str(f), "prediction": names[int(label)],
                 **{f"p[{n}]": round(float(p), 6) for n, p in zip(names, probs)}}
                for f, label, probs in zip(files, pred.labels, pred.probs)]
    elif kind == "text":
        rows = _adapt_text(learner, args)
    elif kind == "table":
        rows = _adapt_table(learner, args)
    elif kind == "vector":
        in_features = _in_features(spec, args.checkpoint)
        if len(args.query) != 1:
            raise UserError("a regression checkpoint takes one query CSV")
        dtype = next(learner.meta.model.parameters()).dtype  # values must be finite in the model's dtype
        sx, sy = mio.load_regression_csv(args.support, in_features, with_target=True, dtype=dtype)
        qx, _ = mio.load_regression_csv(args.query[0], in_features, with_target=False, dtype=dtype)
        task_model = learner.adapt(sx, sy, args.steps)
        _summary(learner, args, f"{len(sy)} support points", None, len(qx))
        values = task_model.predict(qx).values
        rows = [{**{f"x{i}": float(v) for i, v in enumerate(x)}, "prediction": float(y.reshape(-1)[0])}
                for x, y in zip(qx, values)]
    else:
        raise UserError(f"{args.checkpoint} takes inputs of type {spec.get('type')!r}, which this version of "
                        "`mamlkit adapt` cannot read; adapt it from Python with tensors")
    return rows


def output_format(output: str) -> str | None:
    """``"csv"`` or ``"json"`` by the suffix of ``output``, whatever its case (``p.JSON`` is JSON), else None:
    the one reading of the suffix, for the check before any work and for the write."""
    suffix = Path(output).suffix.lower()
    return suffix[1:] if suffix in (".csv", ".json") else None


def _check_output(output: str | None) -> None:
    """Refuse an --output that could not be written, before any work is done."""
    if not output:
        return
    path = Path(output)
    if output_format(output) is None:
        raise UserError(f"--output must end in .csv or .json, got {output}")
    if path.is_dir():
        raise UserError(f"--output {output} is a folder; name a .csv or .json file")
    if not path.parent.is_dir():
        raise UserError(f"--output {output}: the folder {path.parent} does not exist; create it or name another")


def _adapt_text(learner, args: argparse.Namespace) -> list[dict]:
    """Support CSV of (text, label) rows; query utterances from a text file or a CSV."""
    from mamlkit.use import inputs

    texts, labels = inputs.read_text_support(args.support, args.text_column, args.label_column)
    names = sorted(set(labels))
    if len(names) < 2:
        raise UserError(f"{args.support} has a single label ({names[0]!r}); a few-shot task needs at least 2 classes")
    if len(args.query) != 1:
        raise UserError("a text checkpoint takes one query file (a text file, one utterance per line, or a CSV)")
    qtexts, qrows = inputs.read_text_query(args.query[0], args.text_column)
    task_model = learner.adapt(texts, labels, args.steps, reset_head=args.reset_head, class_names=names)
    _summary(learner, args, f"{len(texts)} support utterances", names, len(qtexts))
    pred = task_model.predict(qtexts)
    ids = _ids(args, qrows)
    return [{"row": i, **ids[i], "text": t, "prediction": names[int(label)],
             **{f"p[{n}]": round(float(p), 6) for n, p in zip(names, probs)}}
            for i, (t, label, probs) in enumerate(zip(qtexts, pred.labels, pred.probs))]


def _adapt_table(learner, args: argparse.Namespace) -> list[dict]:
    """Support CSV: the model's feature columns and its target; query CSV: the feature columns."""
    from mamlkit.use import inputs

    spec, pre = learner.input, learner.model_spec["preprocess"]
    if len(args.query) != 1:
        raise UserError("a CSV-task checkpoint takes one query CSV")
    header, rows, lines = inputs.read_csv_rows(args.support)
    if spec["target"] not in header:
        raise UserError(f"{args.support} has no target column {spec['target']!r}; the support CSV needs the "
                        f"feature columns ({', '.join(inputs.feature_columns(pre))}) and the target "
                        f"{spec['target']!r}. Its columns are {', '.join(header)}")
    fill = spec.get("fill", "none")
    sx = inputs.encode_rows(rows, learner.model_spec, fill=fill, where=str(args.support), lines=lines)
    targets = [r[spec["target"]] for r in rows]
    inputs.encode_targets(targets, learner.model_spec, where=str(args.support), lines=lines)  # errors name lines
    _, qrows, qlines = inputs.read_csv_rows(args.query[0])
    qx = inputs.encode_rows(qrows, learner.model_spec, fill=fill, where=str(args.query[0]), lines=qlines)
    task_model = learner.adapt(sx, targets, args.steps, reset_head=args.reset_head)  # targets in their units
    classes = sorted({str(t) for t in targets}) if pre["kind"] == "classification" else None
    _summary(learner, args, f"{len(targets)} support rows", classes, len(qrows))
    pred = task_model.predict(qx)
    ids = _ids(args, qrows)
    if pre["kind"] == "classification":
        return [{"row": i, **ids[i], "prediction": pre["classes"][int(label)],
                 **{f"p[{n}]": round(float(p), 6) for n, p in zip(pre["classes"], probs)}}
                for i, (label, probs) in enumerate(zip(pred.labels, pred.probs))]
    return [{"row": i, **ids[i], "prediction": float(v.reshape(-1)[0])} for i, v in enumerate(pred.values)]


def _summary(learner, args: argparse.Namespace, support: str, classes: list[str] | None, queries: int) -> None:
    """One line on stderr saying what the adaptation did: steps, the learner's inner rule in its own words
    (``describe()``), support size and classes."""
    cfg = learner.cfg
    steps = args.steps if args.steps is not None else getattr(learner.meta, "test_inner_steps", cfg.eval_inner_steps)
    rule = learner.meta.describe()
    shown = "" if classes is None else f" of {len(classes)} classes ({_listed(classes)})"
    print(f"mamlkit: adapted {args.checkpoint} ({cfg.algo}): {steps} step{'s' * (steps != 1)} of {rule} on "
          f"{support}{shown}; predicting {queries} quer{'ies' if queries != 1 else 'y'}", file=sys.stderr)


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def _ids(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """The id column's value per query row (``--id-column``, else a column named ``id``), or nothing."""
    column = args.id_column or ("id" if rows and "id" in rows[0] else None)
    if column is None:
        return [{} for _ in rows]
    if rows and column not in rows[0]:
        raise UserError(f"--id-column {column!r} is not a column of {args.query[0]}; its columns are "
                        f"{', '.join(rows[0]) or '(a plain text file has none)'}")
    return [{column: r[column]} for r in rows]


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


def _write(rows: list[dict], output: str | None) -> None:
    from mamlkit.checkpoint import atomic_write_text  # a full disk leaves the old file or none, never a stub

    if output and output_format(output) == "json":
        atomic_write_text(Path(output), json.dumps(rows, indent=2))
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    if output:
        atomic_write_text(Path(output), buf.getvalue())
    else:
        print(buf.getvalue(), end="")
