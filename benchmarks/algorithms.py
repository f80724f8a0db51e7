"""The MAML family on one engine, compared at an equal wall-clock budget.

For each algorithm and workload, a fresh process meta-trains for ``--budget`` seconds with the
library's own pieces (``train.build``, the meta-optimiser and schedule, ``set_step``), then
evaluates on fixed test tasks. Reported: iterations done, tasks/s (meta-steps only, sampling
excluded), peak memory (growth of the process's peak RSS over its size before training), and the
final query MSE or accuracy ± 95% CI. Two extra tables: the ANIL/MAML training-step time ratio
(interleaved runs, median), and peak memory against the number of inner steps (MAML, FOMAML, iMAML).

    .venv/bin/python benchmarks/algorithms.py --budget 40

Workloads: ``sinusoid`` (Finn et al. 2017's regression setting, every algorithm with 1 inner step
except Reptile and iMAML, which use their own inner solvers) and ``omniglot`` 5-way 1-shot with each
paper's preset (``mamlkit presets``). Timings are for the machine they ran on; compare rows of one run.
The tables are printed in Markdown, with the command, machine and date, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALGOS = ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml", "pretrain"]
# workload -> algo -> (preset, overrides)
SINUSOID = {a: ("sinusoid", {"algo": a}) for a in ALGOS}
SINUSOID["reptile"] = ("sinusoid", {"algo": "reptile", "reptile_inner_lr": 0.02, "reptile_inner_steps": 5})
SINUSOID["imaml"] = ("sinusoid", {"algo": "imaml", "inner_steps": 5, "imaml_lambda": 1.0, "cg_steps": 5})
OMNIGLOT = {"maml": ("omniglot-5w1s", {}), "anil": ("omniglot-5w1s", {"algo": "anil"}),
            **{a: (f"omniglot-5w1s-{a}", {}) for a in ("fomaml", "metasgd", "mamlpp", "reptile", "imaml")}}
WORKLOADS = {"sinusoid": SINUSOID, "omniglot": OMNIGLOT}
DATA_ROOT = str(ROOT.parent / "shared" / "data" / "omniglot")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM; Linux >= 4.0) and return the current RSS, so that
    the peak read later covers only what runs after this call (not data loading)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_bytes()


def _peak_growth_mb(rss0: int) -> float:
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return (hwm - rss0) / 2**20


def _config(workload: str, algo: str, extra: dict):
    from mamlkit.presets import preset_config

    preset, overrides = WORKLOADS[workload][algo]
    over = {**overrides, **extra, "progress": False, "tensorboard": False}
    if workload == "omniglot":
        over["data_root"] = DATA_ROOT
    return preset_config(preset, over)


def _train_step(learner, opt, cfg, step, batch):
    from mamlkit.loop.schedules import meta_lr_at

    opt.zero_grad(set_to_none=True)
    if hasattr(learner, "set_step"):
        learner.set_step(step)
    for g in opt.param_groups:
        g["lr"] = meta_lr_at(cfg, step)
    stats = learner.meta_backward(batch)
    opt.step()
    return stats


def worker_train(workload: str, algo: str, budget: float, eval_tasks: int, threads: int) -> dict:
    """Meta-train ``algo`` for ``budget`` seconds, then evaluate on fixed test tasks."""
    import torch

    from mamlkit.eval.evaluate import evaluate, test_tasks
    from mamlkit.eval.reports import EVAL_SEED_OFFSET
    from mamlkit.loop import train
    from mamlkit.loop.schedules import meta_optimizer
    from mamlkit.tasks import Sinusoid, get_family, task_generator

    torch.set_num_threads(threads)
    cfg = _config(workload, algo, {})
    learner, _ = train.build(cfg)
    opt = meta_optimizer(cfg, learner.meta_parameters().values())
    dist = get_family(cfg.task).build(cfg, "train")
    dist.sample(cfg.meta_batch, task_generator(cfg.seed, "train", 10**9))  # load data before measuring
    rss0 = _reset_peak()
    start, step, compute = time.perf_counter(), 0, 0.0
    while time.perf_counter() - start < budget:
        batch = dist.sample(cfg.meta_batch, task_generator(cfg.seed, "train", step))
        t = time.perf_counter()
        stats = _train_step(learner, opt, cfg, step, batch)
        compute += time.perf_counter() - t
        step += 1
    peak = _peak_growth_mb(rss0)
    if workload == "sinusoid":
        sinusoid = Sinusoid(k_support=cfg.k_shot, k_query=cfg.eval_query or cfg.k_shot)
        tasks = test_tasks(sinusoid, cfg.seed + EVAL_SEED_OFFSET, eval_tasks)
        steps = 10
    else:
        tasks = test_tasks(get_family(cfg.task).build(cfg, "test"), cfg.seed + EVAL_SEED_OFFSET, eval_tasks)
        steps = cfg.eval_inner_steps
    res = evaluate(learner, tasks, steps, batch_size=50)
    mean, ci = res.loss(steps) if workload == "sinusoid" else res.acc(steps)
    mean1, ci1 = res.loss(1) if workload == "sinusoid" else res.acc(1)
    return {"algo": algo, "workload": workload, "iterations": step, "meta_batch": cfg.meta_batch,
            "tasks_per_s": step * cfg.meta_batch / compute, "step_ms": 1000 * compute / step,
            "peak_mb": peak, "metric": mean, "ci": ci, "eval_steps": steps,
            "metric1": mean1, "ci1": ci1,
            "train_loss": stats["loss"], "strategy": learner.executor.strategy.name}


def worker_steptime(threads: int, reps: int) -> list[dict]:
    """ANIL vs MAML step time, interleaved, median of ``reps``."""
    import torch

    from mamlkit.loop import train
    from mamlkit.loop.schedules import meta_optimizer
    from mamlkit.tasks import get_family, task_generator

    torch.set_num_threads(threads)
    rows = []
    for workload, steps, batch_size in (("sinusoid", 1, 25), ("sinusoid", 5, 25), ("omniglot", 1, 8),
                                         ("omniglot", 5, 8)):
        runs = {}
        for algo in ("maml", "anil"):
            cfg = _config(workload, algo, {"algo": algo, "inner_steps": steps, "meta_batch": batch_size})
            learner, _ = train.build(cfg)
            opt = meta_optimizer(cfg, learner.meta_parameters().values())
            dist = get_family(cfg.task).build(cfg, "train")
            batch = dist.sample(cfg.meta_batch, task_generator(cfg.seed, "train", 0))
            runs[algo] = (learner, opt, cfg, batch, [])
        for r in range(reps + 2):
            for learner, opt, cfg, batch, times in runs.values():
                t = time.perf_counter()
                _train_step(learner, opt, cfg, r, batch)
                if r >= 2:  # warm-up
                    times.append(time.perf_counter() - t)
        med = {a: statistics.median(v[4]) for a, v in runs.items()}
        rows.append({"workload": workload, "inner_steps": steps, "meta_batch": batch_size,
                     "maml_ms": 1000 * med["maml"], "anil_ms": 1000 * med["anil"],
                     "speedup": med["maml"] / med["anil"]})
    return rows


def worker_memory(algo: str, steps: int, threads: int) -> dict:
    """Peak RSS growth of 3 meta-steps on Omniglot 5w1s (conv4, meta-batch 8 in one chunk, so all 8 graphs
    are alive together) with ``steps`` inner steps."""
    import torch

    from mamlkit.loop import train
    from mamlkit.loop.schedules import meta_optimizer
    from mamlkit.tasks import get_family, task_generator

    torch.set_num_threads(threads)
    cfg = _config("omniglot", "maml", {"algo": algo, "inner_steps": steps, "meta_batch": 8, "inner_lr": 0.1,
                                       "strategy": "loop", "chunk_size": 8})  # all 8 graphs alive at once
    learner, _ = train.build(cfg)
    opt = meta_optimizer(cfg, learner.meta_parameters().values())
    batch = get_family(cfg.task).build(cfg, "train").sample(8, task_generator(cfg.seed, "train", 0))
    rss0 = _reset_peak()
    t = time.perf_counter()
    for s in range(3):
        _train_step(learner, opt, cfg, s, batch)
    return {"algo": algo, "inner_steps": steps, "peak_mb": _peak_growth_mb(rss0),
            "step_ms": 1000 * (time.perf_counter() - t) / 3}


def _spawn(*args: str) -> object:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=40.0, help="training seconds per algorithm and workload")
    ap.add_argument("--workloads", nargs="+", default=["sinusoid", "omniglot"], choices=list(WORKLOADS))
    ap.add_argument("--algos", nargs="+", default=ALGOS)
    ap.add_argument("--eval-tasks", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions for the ANIL/MAML ratio")
    ap.add_argument("--skip-extras", action="store_true", help="only the equal-budget table")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "train":
            out = worker_train(rest[0], rest[1], float(rest[2]), int(rest[3]), int(rest[4]))
        elif kind == "steptime":
            out = worker_steptime(int(rest[0]), int(rest[1]))
        else:
            out = worker_memory(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return

    import torch

    lines = [f"## MAML family at equal wall-clock budget ({datetime.date.today().isoformat()})", "",
             f"Command: `.venv/bin/python benchmarks/{Path(__file__).name} " + " ".join(sys.argv[1:]) + "`",
             f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (compare rows of one run: other "
             "processes on the machine move the timings), "
             f"torch {torch.__version__}, {args.threads} thread(s) per process, float32.", ""]
    for workload in args.workloads:
        algos = [a for a in args.algos if a in WORKLOADS[workload]]
        rows = []
        for algo in algos:
            rows.append(_spawn("train", workload, algo, str(args.budget), str(args.eval_tasks),
                               str(args.threads)))
            print(json.dumps(rows[-1]), flush=True)
        base = next((r for r in rows if r["algo"] == "maml"), rows[0])
        metric = "query MSE (K=10 shots)" if workload == "sinusoid" else "test accuracy (%)"
        scale = 1 if workload == "sinusoid" else 100
        lines += [f"### {workload}: {args.budget:g} s of training each, {args.eval_tasks} fixed test tasks",
                  "",
                  f"| algo | iterations | tasks/s | vs MAML | step ms | peak MB | {metric} after 1 step | "
                  f"{metric} after N steps | N |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['algo']} | {r['iterations']} | {r['tasks_per_s']:.1f} | "
                         f"{r['tasks_per_s'] / base['tasks_per_s']:.2f}× | {r['step_ms']:.1f} | "
                         f"{r['peak_mb']:.1f} | "
                         f"{scale * r['metric1']:.3f} ± {scale * r['ci1']:.3f} | "
                         f"{scale * r['metric']:.3f} ± {scale * r['ci']:.3f} | {r['eval_steps']} |")
        lines.append("")
    if not args.skip_extras:
        ratio = _spawn("steptime", str(args.threads), str(args.reps))
        lines += ["### ANIL / MAML training-step time (median of interleaved runs)", "",
                  "The ANIL paper reports ~1.7× faster training steps than MAML (mini-ImageNet, GPU). "
                  "Omniglot rows use real 5-way 1-shot batches, conv4 (64 filters), loop strategy.", "",
                  "| workload | inner steps | meta-batch | MAML ms | ANIL ms | MAML/ANIL |",
                  "|---|---|---|---|---|---|"]
        for r in ratio:
            print(json.dumps(r), flush=True)
            lines.append(f"| {r['workload']} | {r['inner_steps']} | {r['meta_batch']} | {r['maml_ms']:.1f} | "
                         f"{r['anil_ms']:.1f} | {r['speedup']:.2f}× |")
        lines += ["", "### Peak memory against inner steps (Omniglot 5w1s, conv4, meta-batch 8 in one chunk, "
                  "3 meta-steps)", "",
                  "| algo | inner steps | peak MB | step ms |", "|---|---|---|---|"]
        for algo in ("maml", "fomaml", "imaml"):
            for steps in (1, 5, 10):
                r = _spawn("memory", algo, str(steps), str(args.threads))
                print(json.dumps(r), flush=True)
                lines.append(f"| {algo} | {steps} | {r['peak_mb']:.1f} | {r['step_ms']:.0f} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)


if __name__ == "__main__":
    main()
