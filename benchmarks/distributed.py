"""Distributed scaling: meta-training throughput (tasks/s) at R ranks, one thread each.

Launch once per rank count, with the same flags; rank 0 prints one JSON line::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=1 benchmarks/distributed.py --preset sinusoid
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/distributed.py --preset sinusoid

It times the trainer's own step (the rank's share of the batch drawn, ``meta_backward`` weighted and
all-reduced by :class:`mamlkit.loop.distributed.World`, optimiser step), after ``--warmup`` steps, with a
barrier before the clock starts and stops. Logging, validation and checkpoints are left out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mamlkit.loop import distributed, train
from mamlkit.presets import preset_config
from mamlkit.tasks import get_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sinusoid")
    parser.add_argument("--iters", type=int, default=50, help="timed meta-iterations")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--meta-batch", type=int, default=0, help="override the preset's (0: keep)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {"progress": False, "tensorboard": False, "data_root": args.data_root}
    if args.meta_batch:
        overrides["meta_batch"] = args.meta_batch
    cfg = preset_config(args.preset, overrides, loose={"data_root"})
    trainer = train.new_trainer(cfg, run_dir=None)  # nothing is written
    learner, opt = trainer.learner, trainer.optimizer
    tasks = get_family(cfg.task).build(cfg, "train")
    with distributed.session(cfg) as world:
        world.broadcast_(learner)

        def step(s: int) -> None:
            batch = world.train_batch(tasks, cfg.seed, s, cfg.meta_batch)
            opt.zero_grad(set_to_none=True)
            world.backward_and_reduce(learner, batch.to(cfg.device, trainer.dtype), cfg.meta_batch)
            opt.step()

        for s in range(args.warmup):
            step(s)
        world.barrier()
        start = time.perf_counter()
        for s in range(args.warmup, args.warmup + args.iters):
            step(s)
        world.barrier()
        elapsed = time.perf_counter() - start
        if world.is_main:
            print(json.dumps({"preset": args.preset, "ranks": world.size, "threads_per_rank": args.threads,
                              "meta_batch": cfg.meta_batch, "iters": args.iters, "seconds": round(elapsed, 3),
                              "tasks_per_s": round(args.iters * cfg.meta_batch / elapsed, 2),
                              "strategy": learner.executor.strategy.name, "torch": torch.__version__,
                              "machine": platform.processor() or platform.machine()}))


if __name__ == "__main__":
    main()
