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
                       "--query a CSV with the feature columns. Vectors: --support is a CSV of inputs then the "
                       "target (regression) or the label (classification), --query a CSV of inputs.")
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
    from mamlkit.models import import_from_here
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
    """Read the support and query files in the checkpoint's input format (:mod:`mamlkit.use.formats`), adapt
    and predict: output rows."""
    from mamlkit.use import formats

    if learner.input is None:
        raise UserError(f"{args.checkpoint} is a {learner.cfg.task!r} checkpoint, and that task family declares no "
                        "raw input format, so `mamlkit adapt` cannot read files for it. Adapt it from Python with "
                        "tensors: mamlkit.load(CHECKPOINT).adapt(support_x, support_y)")
    fmt = formats.lookup(learner.input, learner.kind, str(args.checkpoint))
    task = fmt.read(learner, formats.Files(args.support, args.query, str(args.checkpoint), args.text_column,
                                           args.label_column, args.id_column))
    for note in task.notes:
        print(f"mamlkit: note: {note}", file=sys.stderr)
    task_model = learner.adapt(task.support_x, task.support_y, args.steps, reset_head=args.reset_head,
                               class_names=task.class_names)
    _summary(learner, args, task.support, task.classes, task.queries)
    return task.rows(task_model.predict(task.query_x))


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
