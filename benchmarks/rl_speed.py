"""Seconds per MAML-TRPO meta-iteration, split into sampling, inner step and TRPO (and TRPO's share
spent on the gradient, the Fisher graph and the conjugate-gradient products, ``cg``, against the line
search), for several variants run interleaved on the same policy and the same tasks:

    python benchmarks/rl_speed.py nav2d --iters 3 --variants base fisher0.2 fisher0.1 lvc dice

Variants: ``base`` (the paper's setting), ``autograd`` (``--no-fast-fisher``: the gradient and Fisher
products by autograd on the whole objective), ``fisherF`` (``--fisher-fraction F``), ``lvc``/``dice``
(``--estimator``), ``fo`` (``--first-order``). Each round runs every variant once, from the same policy
parameters on the tasks of iteration ``round`` (the trainer's ``task_generator(seed, "train", round)``),
so the variants see identical work; after one untimed warm-up step, the medians over rounds are printed
as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mamlkit.base.batch import task_generator
from mamlkit.rl import train
from mamlkit.rl.config import RLConfig
from mamlkit.rl.envs import sample_tasks
from mamlkit.rl.maml_trpo import MAMLTRPO

PHASES = ("time_sample_s", "time_inner_s", "time_trpo_s", "time_cg_s")


def variant_config(base: RLConfig, name: str) -> RLConfig:
    if name == "base":
        return base
    if name.startswith("fisher"):
        return base.replace(fisher_fraction=float(name[len("fisher"):]))
    if name in ("lvc", "dice"):
        return base.replace(estimator=name)
    if name == "fo":
        return base.replace(first_order=True)
    if name == "autograd":
        return base.replace(fast_fisher=False)
    raise SystemExit(f"unknown variant {name!r}: base, autograd, fisherF (e.g. fisher0.2), lvc, dice, fo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("env", nargs="?", default="nav2d")
    ap.add_argument("--iters", type=int, default=3, help="rounds (each runs every variant once)")
    ap.add_argument("--variants", nargs="+", default=["base", "fisher0.2"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--meta-batch", type=int, default=20)
    ap.add_argument("--traj-per-task", type=int, default=20)
    ap.add_argument("--horizon", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = RLConfig(env=args.env, meta_batch=args.meta_batch, traj_per_task=args.traj_per_task,
                    horizon=args.horizon)
    configs = {v: variant_config(base, v) for v in args.variants}
    start = train.make_policy(base).state_dict()
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in configs}
    # warm-up (not timed): the first meta-step of a process pays torch.func's one-time set-up (~10 s)
    warm = train.make_policy(base)
    MAMLTRPO(warm, base).meta_step(sample_tasks(base.env, base.meta_batch, task_generator(base.seed, "warm", 0)),
                                   task_generator(base.seed, "warm", 0))
    for r in range(args.iters):
        for name, cfg in configs.items():
            policy = train.make_policy(cfg)
            policy.load_state_dict(start)
            gen = task_generator(cfg.seed, "train", r)
            tasks = sample_tasks(cfg.env, cfg.meta_batch, gen)
            clock = time.perf_counter()
            stats = MAMLTRPO(policy, cfg).meta_step(tasks, gen)
            stats["total_s"] = time.perf_counter() - clock
            rows[name].append(stats)
            print(f"round {r} {name}: " + ", ".join(f"{k} {stats[k]:.2f}" for k in (*PHASES, "total_s")),
                  flush=True)
    print(f"\n{args.env}, {base.meta_batch} tasks x {base.traj_per_task} episodes x horizon "
          f"{base.episode_len}, {args.threads} thread(s); median over {args.iters} rounds (seconds)\n")
    print("| variant | sampling | inner step | TRPO | of which grad+Fisher+CG | total | KL after | backtracks |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs) for k in (*PHASES, "total_s", "kl", "backtracks")}
        print(f"| {name} | {med['time_sample_s']:.2f} | {med['time_inner_s']:.2f} | {med['time_trpo_s']:.2f} | "
              f"{med['time_cg_s']:.2f} | {med['total_s']:.2f} | {med['kl']:.4f} | {med['backtracks']:.0f} |")


if __name__ == "__main__":
    main()
