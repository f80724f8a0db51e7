"""Peak memory of second-order MAML against the number of inner steps, with and without the
checkpointed inner loop (``--checkpoint-inner``), and what the checkpointing costs in time.

Each configuration runs in its own process (so peak RSS is its own) on the same batches:

    python benchmarks/memory.py --workload miniimagenet-5w1s --steps 1 5 10 20 --threads 1

Columns: peak tensor memory of one meta-iteration (``mamlkit.exec.memory``, the trainer's estimate for the
whole meta-batch), the process's peak RSS, and seconds per meta-iteration. The strategy is the loop
(one task's graph alive at a time), the only one the checkpointed inner loop runs in; ``--strategy
vmap`` shows the vmap figures without checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import WORKLOADS, peak_rss_mb, workload, workload_data, workload_model  # noqa: E402


def run_one(name: str, steps: int, ckpt: bool, strategy: str, iters: int) -> dict:
    import mamlkit
    from mamlkit.exec.tuning import backward_peak

    w = workload(name)
    model = workload_model(name)
    learner = mamlkit.MAML(model, inner_lr=w["inner_lr"], inner_steps=steps, loss_fn=w["loss"], kind=None
                           if w["loss"] is not torch.nn.functional.cross_entropy else "classification",
                           strategy=strategy, checkpoint_inner=ckpt)
    data = workload_data(name, iters)
    peak = backward_peak(learner.executor, learner.work(), data[0], learner.executor.strategy)
    learner.meta_backward(data[0])  # warm-up
    start = time.perf_counter()
    for batch in data:
        learner.meta_backward(batch)
    return {"steps": steps, "checkpoint": ckpt, "strategy": strategy, "peak_tensor_mb": peak / 2**20,
            "peak_rss_mb": peak_rss_mb(),
            "s_per_it": (time.perf_counter() - start) / len(data)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="omniglot-20w1s", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--strategy", default="loop", choices=["loop", "vmap"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default="")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.data_root:
        os.environ["MAMLKIT_BENCH_DATA"] = args.data_root
    if args.child:
        steps, ckpt = args.child.split(",")
        print(json.dumps(run_one(args.workload, int(steps), ckpt == "1", args.strategy, args.iters)))
        return
    w = workload(args.workload)
    print(f"workload {args.workload} (meta-batch {w['meta_batch']}), strategy {args.strategy}, second order, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("| inner steps | checkpointed | peak tensors (MB) | peak RSS (MB) | s / meta-iteration | time × plain |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        plain = None
        for ckpt in ([False, True] if args.strategy == "loop" else [False]):
            cmd = [sys.executable, __file__, "--child", f"{steps},{int(ckpt)}", "--workload", args.workload,
                   "--strategy", args.strategy, "--iters", str(args.iters), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {steps} | {ckpt} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]} |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            plain = plain or r["s_per_it"]
            print(f"| {steps} | {'yes' if ckpt else 'no'} | {r['peak_tensor_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['s_per_it']:.3f} | {r['s_per_it'] / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
