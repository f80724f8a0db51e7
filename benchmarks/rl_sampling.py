"""Meta-RL sampling speed, and `mamlkit rl train` on 1 against several torchrun ranks.

    python benchmarks/rl_sampling.py steps nav2d --rounds 5          # environment steps per second
    python benchmarks/rl_sampling.py ranks nav2d --ranks 1 2 --iters 6

``steps``: one batch of ``T x N`` episodes with the policy evaluated once per time step for every copy
(``mamlkit.rl.sampling.rollout``, the sampler) against the same episodes with the policy evaluated per
copy (one call per environment per step) and, for the half-cheetah, with each simulator stepped by
gymnasium's ``step`` (the sampler before it called MuJoCo itself); interleaved round by round, one
thread; the median steps/s.

``ranks``: ``torchrun --nproc_per_node=R -m mamlkit rl train ENV`` for each R (one thread per rank, gloo),
and the median over the iterations after the first of the seconds per meta-iteration in sampling (both
samplings and the advantages), the inner step and TRPO, as rank 0 logs them in ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mamlkit.base.batch import task_generator
from mamlkit.rl import sampling
from mamlkit.rl.config import RLConfig
from mamlkit.rl.envs import make_env, sample_tasks
from mamlkit.rl.train import make_policy


def per_copy(policy_fn: sampling.PolicyFn) -> sampling.PolicyFn:
    """The policy evaluated for one environment copy at a time (what a sampler stepping one env does)."""
    def fn(obs: torch.Tensor) -> torch.Tensor:
        T, N = obs.shape[:2]
        return torch.stack([torch.stack([policy_fn(obs[t, n][None, None])[0, 0] for n in range(N)])
                            for t in range(T)])
    return fn


def gymnasium_steps(sims: list, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mamlkit.rl.cheetah._step_all`` through gymnasium's ``step`` (the same numbers, its Python per step)."""
    out = [sim.step(a) for sim, a in zip(sims, actions)]
    return np.stack([o[0] for o in out]), np.array([o[4]["x_velocity"] for o in out])


@contextlib.contextmanager
def stepping(how: str):
    if how != "gymnasium":
        yield
        return
    from mamlkit.rl import cheetah

    ours, cheetah._step_all = cheetah._step_all, gymnasium_steps
    try:
        yield
    finally:
        cheetah._step_all = ours


def steps(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cfg = RLConfig(env=args.env, meta_batch=args.meta_batch, traj_per_task=args.traj_per_task, horizon=args.horizon)
    policy = make_policy(cfg)
    fn = sampling.policy_fn(policy, {k: v.detach() for k, v in policy.named_parameters()}, per_task=False)
    tasks = sample_tasks(cfg.env, cfg.tasks_per_batch, task_generator(0, "bench", 0))
    n_steps = cfg.tasks_per_batch * cfg.traj_per_task * cfg.episode_len
    variants = {"sampler": (fn, "mujoco"), "policy per copy": (per_copy(fn), "mujoco")}
    if cfg.env.startswith("cheetah-"):   # the half-cheetah's own stepping against gymnasium's
        variants["gymnasium step"] = (fn, "gymnasium")
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (f, how) in variants.items():
            env = make_env(cfg.env, tasks, cfg.traj_per_task, cfg.episode_len, cfg.env_action_scale)
            with stepping(how):
                clock = time.perf_counter()
                sampling.rollout(env, f, torch.Generator().manual_seed(0))
                rates[name].append(n_steps / (time.perf_counter() - clock))
    print(f"{cfg.env}: {cfg.tasks_per_batch} tasks x {cfg.traj_per_task} episodes x horizon {cfg.episode_len}, "
          f"1 thread, median of {args.rounds} rounds")
    ours = statistics.median(rates["sampler"])
    for name, r in rates.items():
        print(f"  {name}: {statistics.median(r):,.0f} steps/s (sampler: {ours / statistics.median(r):.2f}x)")


def ranks(args: argparse.Namespace) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    root = Path(__file__).resolve().parents[1]
    for r in args.ranks:
        with tempfile.TemporaryDirectory() as out, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            flags = ["--iterations", str(args.iters), "--threads", "1", "--no-progress", "--no-baselines",
                     "--val-every", "0", "--checkpoint-every", str(args.iters), "--out-dir", out, "--run-name", "b",
                     "--meta-batch", str(args.meta_batch), "--traj-per-task", str(args.traj_per_task),
                     "--horizon", str(args.horizon), "--eval-tasks", "2", "--eval-traj", "1", "--eval-lrs", "0.1"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
            clock = time.perf_counter()
            subprocess.run([str(torchrun), f"--nproc_per_node={r}", "--master-addr=127.0.0.1", f"--master-port={port}",
                            "-m", "mamlkit", "rl", "train", args.env, *flags], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - clock
            logged = [json.loads(x) for x in open(Path(out) / "b" / "metrics.jsonl")]
            rows = [x for x in logged if x["split"] == "train"][1:]  # the first pays torch.func's set-up
            med = {k: statistics.median(x[k] for x in rows) for k in ("time_sample_s", "time_inner_s", "time_trpo_s")}
            total = sum(med.values())
            print(f"{r} rank(s): sampling {med['time_sample_s']:.3f} s, inner step {med['time_inner_s']:.3f} s, "
                  f"TRPO {med['time_trpo_s']:.3f} s, sum {total:.3f} s per meta-iteration "
                  f"(median of {len(rows)}; whole command {wall:.1f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("steps", "ranks"))
    ap.add_argument("env", nargs="?", default="nav2d")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--meta-batch", type=int, default=20)
    ap.add_argument("--traj-per-task", type=int, default=20)
    ap.add_argument("--horizon", type=int, default=0)
    args = ap.parse_args()
    (steps if args.mode == "steps" else ranks)(args)


if __name__ == "__main__":
    main()
