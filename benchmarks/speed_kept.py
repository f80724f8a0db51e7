"""Speed kept across a change: this tree against another checkout of mamlkit, through the public API only, in
interleaved rounds, each measurement in a fresh process with one intra-op thread.

    git worktree add /tmp/mamlkit-before <commit>
    python benchmarks/speed_kept.py --before /tmp/mamlkit-before --rounds 5

Each round runs every (workload, strategy) once with this tree and once with the other, in alternating order,
so that a change in the machine's load hits both alike. A process builds ``mamlkit.MAML(model, ...)`` with the
strategy named, calls ``meta_backward`` on one fixed batch until warm (the compiled strategy builds its kernel
here), then times ``--iters`` calls. It reports the process's CPU seconds per call as well as wall seconds: on a
shared machine the wall clock also counts the time other jobs held the core, the CPU time much less so. Prints,
per workload and strategy, the median over rounds of each tree and the median of the per-round ratios of
times, before / after (the speed now over the speed before: above 1 is faster now), with their range.

Workloads (the models are plain ``nn.Module``s written here, so that both trees run the same code):
``sinusoid`` (the paper's 1-40-40-1 MLP, 10 support and 10 query points, meta-batch 25, one inner step of 0.01)
and ``omniglot`` (the paper's Conv4 with stride-2 convolutions and batch norm, 5-way 1-shot with one query per
class, 28x28 inputs, meta-batch 8, one inner step of 0.4); the inputs are random, which does not change the work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
from torch import nn
import torch.nn.functional as F
torch.set_num_threads(1)
import mamlkit
from mamlkit.base.batch import TaskBatch

workload, strategy, iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
if workload == "sinusoid":
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    batch = TaskBatch(*(torch.rand(25, 10, 1, generator=g) for _ in range(4)))
    learner = mamlkit.MAML(model, inner_lr=0.01, inner_steps=1, loss_fn=F.mse_loss, kind="regression",
                           strategy=strategy)
else:
    def block(c_in):
        return [nn.Conv2d(c_in, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU()]
    model = nn.Sequential(*block(1), *block(64), *block(64), *block(64), nn.Flatten(), nn.Linear(256, 5))
    x = lambda: torch.rand(8, 5, 1, 28, 28, generator=g)
    y = torch.arange(5).repeat(8, 1)
    batch = TaskBatch(x(), y, x(), y)
    learner = mamlkit.MAML(model, inner_lr=0.4, inner_steps=1, loss_fn=F.cross_entropy, kind="classification",
                           strategy=strategy)
warm = 60 if workload == "sinusoid" else 3
for _ in range(warm):
    learner.meta_backward(batch)
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(iters):
    learner.meta_backward(batch)
print(json.dumps({"cpu": (time.process_time() - cpu) / iters, "wall": (time.perf_counter() - wall) / iters}))
"""

CASES = {"sinusoid": ("vmap", "compile", "loop"), "omniglot": ("loop", "threads", "vmap")}
ITERS = {"sinusoid": 600, "omniglot": 12}


def measure(tree: Path, workload: str, strategy: str, iters: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, workload, strategy, str(iters)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{tree} {workload} {strategy} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="a checkout of mamlkit to compare this tree with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the timed iterations by this")
    args = ap.parse_args()
    trees = {"after": HERE, "before": args.before.resolve()}
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        order = ("after", "before") if r % 2 == 0 else ("before", "after")
        for workload in args.workloads:
            for strategy in CASES[workload]:
                for name in order:
                    got = measure(trees[name], workload, strategy, max(1, int(ITERS[workload] * args.scale)))
                    results.setdefault((workload, strategy, name), []).append(got)
                    print(f"round {r + 1} {workload} {strategy} {name}: {1e3 * got['cpu']:.3f} ms CPU, "
                          f"{1e3 * got['wall']:.3f} ms wall", flush=True)
    print(f"\nafter: {trees['after']}, before: {trees['before']}; {args.rounds} rounds, one thread; per call, "
          "median over rounds; ratio: before / after per round (above 1: faster now), median (range)")
    print("| workload | strategy | CPU ms after / before | CPU ratio | wall ms after / before | wall ratio |")
    print("|---|---|---|---|---|---|")
    for workload in args.workloads:
        for strategy in CASES[workload]:
            a, b = results[workload, strategy, "after"], results[workload, strategy, "before"]
            cells = []
            for key in ("cpu", "wall"):
                ratios = [y[key] / x[key] for x, y in zip(a, b)]
                cells.append(f"{1e3 * statistics.median(x[key] for x in a):.3f} / "
                             f"{1e3 * statistics.median(y[key] for y in b):.3f}")
                cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
            print(f"| {workload} | {strategy} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
