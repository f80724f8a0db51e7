"""Speed through the Python API: ``mamlkit.MAML(model)`` (default ``auto``) against hand-written references,
all in ONE process, in interleaved rounds, on one intra-op thread each.

    python benchmarks/api_speed.py --workload sinusoid --rounds 7 --iters 100
    python benchmarks/api_speed.py --workload omniglot-5w1s-mb8 --rounds 5 --iters 10 --data-root DATA

Each implementation gets its own copy of the same initial model, its own Adam(1e-3) and the same batches;
an iteration is the meta-gradient plus the Adam step, as in training. The first round is a warm-up (it
includes ``auto``'s trial, which a Python caller's first call runs). Every later round times each
implementation once, in turn, so that a change in the machine's load hits all of them alike. Prints tasks/s
per round and the ratio of ``mamlkit-api`` to each reference, min–max over rounds (each round's own ratio).

References (:mod:`throughput`'s): ``torch.func`` (``grad`` of the ``vmap``-ped per-task query loss after the
inner SGD steps, differentiated through them), ``loop`` (a plain per-task loop with
``autograd.grad(create_graph=True)``) and, where installed, ``learn2learn`` and ``higher``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import (  # noqa: E402
    make_mamlkit,
    setup_higher,
    setup_learn2learn,
    setup_loop,
    setup_torchfunc,
    workload,
    workload_data,
    workload_model,
)

PEERS = {"torch.func": setup_torchfunc, "loop": setup_loop, "learn2learn": setup_learn2learn,
         "higher": setup_higher}
API = "mamlkit-api"


def installed(name: str) -> bool:
    return name not in ("learn2learn", "higher") or importlib.util.find_spec(name) is not None


def timed_round(step, opt, data: list, iters: int) -> float:
    """Seconds for ``iters`` meta-iterations (meta-gradient and Adam step)."""
    start = time.perf_counter()
    for i in range(iters):
        opt.zero_grad(set_to_none=True)
        step(data[i % len(data)])
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="sinusoid", choices=["sinusoid", "omniglot-5w1s-mb8"])
    ap.add_argument("--peers", nargs="+", default=list(PEERS))
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds, after one warm-up round")
    ap.add_argument("--iters", type=int, default=100, help="meta-iterations per implementation per round")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, the same for every implementation")
    ap.add_argument("--data-root", default="", help="dataset root for Omniglot (sets MAMLKIT_BENCH_DATA)")
    args = ap.parse_args()
    if args.data_root:
        os.environ["MAMLKIT_BENCH_DATA"] = args.data_root
    torch.set_num_threads(args.threads)
    trial: list[str] = []  # auto's trial (in the warm-up round) says what it timed and kept
    handler = logging.Handler()
    handler.emit = lambda record: trial.append(record.getMessage())
    logging.getLogger("mamlkit").addHandler(handler)
    logging.getLogger("mamlkit").setLevel(logging.INFO)
    w = workload(args.workload) | {"name": args.workload}
    data = workload_data(args.workload, min(args.iters, 50))
    impls = {API: make_mamlkit("auto", api=True)} | {k: PEERS[k] for k in args.peers if installed(k)}
    runs = {}
    for name, setup in impls.items():
        model = workload_model(args.workload)
        runs[name] = (setup(model, w | {"first_batch": data[0]}), torch.optim.Adam(model.parameters(), lr=1e-3))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds + 1):
        for name, (step, opt) in runs.items():
            t = timed_round(step, opt, data, args.iters if r else max(2, args.iters // 10))
            if r:
                seconds[name].append(t)
    tasks = args.iters * w["meta_batch"]
    print(f"{args.workload}: meta-batch {w['meta_batch']}, {args.iters} iterations x {args.rounds} rounds, "
          f"{args.threads} intra-op thread(s), torch {torch.__version__}")
    for line in trial:
        if "strategy timing" in line or "runs tasks with" in line:
            print(f"  {line}")
    for name, ts in seconds.items():
        speeds = [tasks / t for t in ts]
        median = sorted(speeds)[len(ts) // 2]
        print(f"  {name:12s} tasks/s {min(speeds):8.0f} - {max(speeds):8.0f}  (median {median:.0f})")
    for name in seconds:
        if name != API:
            ratios = [b / a for a, b in zip(seconds[API], seconds[name])]
            print(f"  {API} / {name}: {min(ratios):.2f} - {max(ratios):.2f}x "
                  f"(median {sorted(ratios)[len(ratios) // 2]:.2f}x)")


if __name__ == "__main__":
    main()
