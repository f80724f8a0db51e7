"""The accuracy cost of `--reset-head`: the meta-learned head against a zero-initialised one.

    python benchmarks/adapt_head.py CHECKPOINT [--tasks 600] [--steps 3 10]

Both adapt with the checkpoint's inner SGD on the same fixed test tasks the report uses; the
reset head starts at zero (uniform predictions) and only the adaptation trains it.
"""

from __future__ import annotations

import argparse

import torch

from mamlkit.eval.evaluate import evaluate, fmt, test_tasks
from mamlkit.eval.reports import EVAL_SEED_OFFSET
from mamlkit.tasks import get_family
from mamlkit.use import api


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--tasks", type=int, default=600)
    ap.add_argument("--steps", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--data-root", default="")
    args = ap.parse_args()
    learner = api.load(args.checkpoint)
    cfg = learner.cfg.replace(data_root=args.data_root) if args.data_root else learner.cfg
    tasks = test_tasks(get_family(cfg.task).build(cfg, "test"), cfg.seed + EVAL_SEED_OFFSET, args.tasks)
    meta = learner.meta
    head = api._head_name(meta.model, cfg.n_way)
    steps = max(args.steps)
    kept = evaluate(meta, tasks, steps, batch_size=50)
    with torch.no_grad():
        for name, p in meta.model.named_parameters():
            if name.startswith(head + "."):
                p.zero_()
    reset = evaluate(meta, tasks, steps, batch_size=50)
    print(f"{args.tasks} test tasks, {cfg.n_way}-way {cfg.k_shot}-shot, α={cfg.inner_lr}; accuracy % ± 95% CI")
    print("| inner steps | meta-learned head | zero-initialised head (--reset-head) | cost (points) |")
    print("|---|---|---|---|")
    for s in args.steps:
        a, b = kept.acc(s), reset.acc(s)
        print(f"| {s} | {fmt(100 * a[0], 100 * a[1], 2)} | {fmt(100 * b[0], 100 * b[1], 2)} | "
              f"{100 * (a[0] - b[0]):.2f} |")


if __name__ == "__main__":
    main()
