"""Meta-World's simulators in mamlkit: environment steps per second and memory, one torch thread.

    python benchmarks/metaworld_speed.py ml1-reach ml1-pick-place ml10 --tasks 4 --copies 20 --steps 100

For each family: the seconds to build ``tasks x copies`` simulators (the copies of a task share one compiled
model), the growth of the process's peak resident memory while they are built, and environment steps per
second stepping them all with random actions and with the (100, 100) Gaussian policy sampling the actions (one
rollout of ``steps`` steps, as training samples). Rates are per second of this process's CPU time, so a busy
shared machine slows them little; the wall-clock rate of the policy's rollout is printed beside them. Building
a benchmark (seconds: it resets 100 tasks) is done first and not timed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from mamlkit.base.batch import task_generator
from mamlkit.rl import metaworld
from mamlkit.rl.config import RLConfig
from mamlkit.rl.envs import make_env
from mamlkit.rl.maml_trpo import MAMLTRPO
from mamlkit.rl.train import make_policy


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(env_name: str, tasks: int, copies: int, steps: int) -> dict[str, float]:
    rows = metaworld.sample_tasks(env_name, tasks, task_generator(0, "train", 0), "train", 0)  # builds the benchmark
    before, clock = peak_mb(), time.perf_counter()
    env = make_env(env_name, rows, copies, steps, 10.0)
    built, grown = time.perf_counter() - clock, peak_mb() - before
    env.reset()
    gen = torch.Generator().manual_seed(0)
    cpu = time.process_time()
    for _ in range(steps):
        env.step(10 * torch.randn(tasks, copies, 4, generator=gen, dtype=torch.float64))
    random_rate = tasks * copies * steps / (time.process_time() - cpu)
    cfg = RLConfig(env=env_name, meta_batch=tasks, traj_per_task=copies, horizon=steps)
    algo = MAMLTRPO(make_policy(cfg), cfg)
    theta = {k: v.detach() for k, v in algo.model.named_parameters()}
    cpu, clock = time.process_time(), time.perf_counter()
    algo.sample(rows, theta, False, gen)
    policy_rate = tasks * copies * steps / (time.process_time() - cpu)
    wall_rate = tasks * copies * steps / (time.perf_counter() - clock)
    return {"build_s": built, "memory_mb": grown, "random": random_rate, "policy": policy_rate, "wall": wall_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("envs", nargs="+", help="Meta-World families, e.g. ml1-reach ml10")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--copies", type=int, default=20, help="episodes per task, stepped together")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.tasks} tasks x {args.copies} copies, {args.steps} steps, one torch thread\n")
    print("| family | build (s) | peak memory growth (MB) | steps per CPU s, random actions | steps per CPU s, "
          "policy | steps per wall s, policy |")
    print("|---|---|---|---|---|---|")
    for name in args.envs:
        r = measure(name, args.tasks, args.copies, args.steps)
        print(f"| {name} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | {r['random']:.0f} | {r['policy']:.0f} | "
              f"{r['wall']:.0f} |")


if __name__ == "__main__":
    main()
