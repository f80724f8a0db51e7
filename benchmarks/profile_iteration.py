"""Where a meta-iteration's time goes: the task sampler and data pipeline against the meta-gradient.

Runs the trainer's own loop body (sample the batch from (seed, "train", step), move it, meta_backward,
Adam step) under ``torch.profiler`` with one labelled range per phase, and prints each phase's share:

    python benchmarks/profile_iteration.py omniglot-5w1s --iters 20 --data-root DATA/omniglot

The strategy is settled first, as ``mamlkit train`` does.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from mamlkit.loop import train
from mamlkit.presets import preset_config
from mamlkit.tasks import get_family, task_generator

PHASES = ("sample", "to_device", "meta_backward", "optimizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--data-root", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset, {"data_root": args.data_root, "strategy": args.strategy}, loose={"data_root"})
    trainer = train.new_trainer(cfg, run_dir=None)
    learner, opt = trainer.learner, trainer.optimizer
    tasks = get_family(cfg.task).build(cfg, "train")

    def batch(step):
        return tasks.sample(cfg.meta_batch, task_generator(cfg.seed, "train", step))

    learner.executor.settle(learner.work(), batch(0), iterations=cfg.iterations)
    for step in range(2):  # warm-up
        opt.zero_grad()
        learner.meta_backward(batch(step))
        opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(2, 2 + args.iters):
            with record_function("sample"):
                b = batch(step)
            with record_function("to_device"):
                b = b.to(cfg.device, trainer.dtype)
            opt.zero_grad()
            with record_function("meta_backward"):
                learner.meta_backward(b)
            with record_function("optimizer"):
                opt.step()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in PHASES}
    whole = sum(totals.values())
    print(f"{args.preset}, strategy {learner.executor.strategy.name}, {args.iters} meta-iterations, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("| phase | ms per meta-iteration | share |")
    print("|---|---|---|")
    for phase in PHASES:
        t = totals.get(phase, 0.0)
        print(f"| {phase} | {t / 1e3 / args.iters:.2f} | {100 * t / whole:.2f}% |")
    data = totals.get("sample", 0.0) + totals.get("to_device", 0.0)
    print(f"data pipeline (sample + to_device): {100 * data / whole:.2f}% of each meta-iteration")


if __name__ == "__main__":
    main()
