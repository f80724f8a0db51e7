"""Episode sampler cost as a fraction of a MAML meta-iteration on Omniglot (issue: "< 5%").

For each preset, times (a) drawing the meta-batch of tasks (``OmniglotTasks.sample`` with the
training generator, as ``mamlkit.loop.train.fit`` does) and (b) a whole meta-iteration (sampling,
``meta_backward``, Adam step), each the median over ``--iters`` repetitions after a warm-up.

    .venv/bin/python benchmarks/sampler.py --threads 1 --iters 10 --data-root DATA/omniglot
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s",
                                                          "omniglot-20w5s"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mamlkit.loop import train
    from mamlkit.presets import preset_config
    from mamlkit.tasks import get_family, task_generator

    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"median of {args.iters}")
    print("| preset | meta-batch | sample (ms) | meta-iteration (ms) | sampler share |")
    print("|---|---|---|---|---|")
    for name in args.presets:
        cfg = preset_config(name, {"data_root": args.data_root, "progress": False}, loose={"data_root"})
        tasks = get_family(cfg.task).build(cfg, "train")
        learner, _ = train.build(cfg)
        opt = torch.optim.Adam(learner.meta_parameters().values(), lr=cfg.meta_lr)
        sample_t, step_t = [], []
        for i in range(args.iters + 1):
            t0 = time.perf_counter()
            batch = tasks.sample(cfg.meta_batch, task_generator(cfg.seed, "train", i))
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            learner.meta_backward(batch)
            opt.step()
            t2 = time.perf_counter()
            if i:  # the first round warms up allocators and kernels
                sample_t.append(t1 - t0)
                step_t.append(t2 - t0)
        s, m = statistics.median(sample_t), statistics.median(step_t)
        print(f"| {name} | {cfg.meta_batch} | {1e3 * s:.2f} | {1e3 * m:.0f} | {100 * s / m:.2f}% |")


if __name__ == "__main__":
    main()
