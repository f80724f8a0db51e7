"""``mamlkit adapt CHECKPOINT --support ... --query ...``: adapt a meta-trained model to your task."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from mamlkit.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="adapt a meta-trained model to your own few examples and predict",
                       description="Adapt a checkpoint to a support set and predict the query set. Images: "
                       "--support is a folder with one sub-folder per class (any size or format); --query is "
                       "files and/or folders. Regression: --support is a CSV of inputs then target, --query a "
                       "CSV of inputs.")
    p.add_argument("checkpoint", help="run folder or checkpoint file written by `mamlkit train`, or the name of "
                   "a model that ships with mamlkit (omniglot-5w1s)")
    p.add_argument("--support", required=True, help="class folders (images) or a CSV (regression)")
    p.add_argument("--query", required=True, nargs="+", help="query images/folders, or a CSV (regression)")
    p.add_argument("--steps", type=int, help="inner steps (default: the checkpoint's test-time steps)")
    p.add_argument("--output", help="write predictions to .csv or .json (default: CSV on stdout)")
    p.add_argument("--reset-head", action="store_true",
                   help="with more classes than the head has outputs: adapt a zero-initialised head of the right size")


def add_example_parser(sub) -> None:
    p = sub.add_parser("example", help="copy an example task that ships with mamlkit into a folder",
                       description="Copy a tiny example task (support/ and query/ folders) to try `mamlkit adapt`.")
    p.add_argument("name", help="example name: omniglot")
    p.add_argument("dest", help="folder to create")


def run_example(args: argparse.Namespace) -> int:
    import shutil

    from mamlkit.api import EXAMPLES

    if args.name not in EXAMPLES:
        raise UserError(f"unknown example {args.name!r}; available: {', '.join(EXAMPLES)}")
    dest = Path(args.dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} exists and is not empty; choose a new folder")
    shutil.copytree(EXAMPLES[args.name], dest, dirs_exist_ok=True)
    print(f"example task in {dest}: {dest / 'support'} (one folder per class), {dest / 'query'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from mamlkit import api
    from mamlkit import io as mio

    learner = api.load(args.checkpoint)
    if not isinstance(learner, api.Learner):
        raise UserError(f"{args.checkpoint} is an already adapted model; `mamlkit adapt` needs a training checkpoint")
    if args.steps is not None and args.steps < 0:
        raise UserError("--steps must be >= 0")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--output must end in .csv or .json, got {args.output}")
    spec = learner.input
    if spec["type"] == "image":
        sx, sy, names, notes = mio.load_image_folder(args.support, spec)
        qx, files, qnotes = mio.load_query_images(args.query, spec)
        for note in sorted(notes | qnotes):
            print(f"mamlkit: note: {note}", file=sys.stderr)
        if learner.n_way and len(names) < learner.n_way:
            print(f"mamlkit: note: {len(names)} classes, the model's head has {learner.n_way} outputs; "
                  f"using the first {len(names)}", file=sys.stderr)
        task_model = learner.adapt(sx, sy, args.steps, reset_head=args.reset_head, class_names=names)
        pred = task_model.predict(qx)
        rows = [{"file": str(f), "prediction": names[int(label)],
                 **{f"p[{n}]": round(float(p), 6) for n, p in zip(names, probs)}}
                for f, label, probs in zip(files, pred.labels, pred.probs)]
    else:
        in_features = _in_features(learner)
        if len(args.query) != 1:
            raise UserError("a regression checkpoint takes one query CSV")
        sx, sy = mio.load_regression_csv(args.support, in_features, with_target=True)
        qx, _ = mio.load_regression_csv(args.query[0], in_features, with_target=False)
        task_model = learner.adapt(sx, sy, args.steps)
        values = task_model.predict(qx).values
        rows = [{**{f"x{i}": float(v) for i, v in enumerate(x)}, "prediction": float(y.reshape(-1)[0])}
                for x, y in zip(qx, values)]
    _write(rows, args.output)
    return 0


def _in_features(learner) -> int:
    first = next(p for p in learner.meta.model.parameters() if p.dim() == 2)
    return first.shape[1]


def _write(rows: list[dict], output: str | None) -> None:
    if output and output.endswith(".json"):
        Path(output).write_text(json.dumps(rows, indent=2))
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    if output:
        Path(output).write_text(buf.getvalue())
    else:
        print(buf.getvalue(), end="")
