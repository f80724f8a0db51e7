"""Every entry point's speed beside one busy process against quiet, in one run.

A user's laptop or a shared node is rarely idle. The default table times each way of using mamlkit, as a
user runs it, quiet and then beside one busy process (a torch job of matrix products on every core, as a
user's other work would be), and prints busy/quiet speed (target: at least 0.5 for every row):

    python benchmarks/contention.py            # under 3 minutes on 2 quiet cores
    python benchmarks/contention.py --quick    # a smoke run: smaller workloads

Rows: ``mamlkit train`` (a short sinusoid run, its report included), ``mamlkit eval``, ``mamlkit adapt``
(a regression CSV, many steps), ``mamlkit rl eval`` and ``mamlkit rl adapt`` (the shipped nav2d policy),
and the Python API: the README's meta-training loop (``meta_loss`` then ``backward``) and
``mamlkit.load(RUN).adapt``. A command row times its whole process (what the user waits for); an API
row times its calls. Each row runs quiet, then beside the busy process (started 0.5 s before, killed
after), ``--rounds`` times alternately, and reports the median of each. Every entry point uses the
trainer's thread plan (:mod:`mamlkit.exec.threads`, ``--threads 0``): one intra-op thread on the CPU.

``--training``: the earlier table, meta-training throughput per implementation beside one
``while True: pass`` process (below).

Meta-training throughput on a quiet machine against beside one competing CPU-bound process, in one run.

A user's laptop or a shared node is rarely idle. This measures how much of its quiet throughput each
implementation keeps when one other process (``python -c "while True: pass"``) holds a core:

    python benchmarks/contention.py --training --data-root DATA_ROOT

Each implementation runs in its own process: it builds, settles its strategy, warms up, then
alternates timed phases, quiet and loaded (the child starts the busy process before a loaded phase
and kills it after), ``--rounds`` times, so that the compile or strategy trial is paid once and a
change in the machine's background load hits both phases alike. It prints meta-iterations/s per
phase (median over rounds) and loaded / quiet.

Rows: ``mamlkit`` with the trainer's own thread choice (``--threads 0``: one intra-op thread, whole
tasks over the cores; :mod:`mamlkit.exec.threads`), ``mamlkit`` with ``--threads 2`` (two intra-op
threads, the choice before), and learn2learn when installed (torch's default thread count, as a user
runs it). Workloads: ``sinusoid`` (no data) and ``omniglot-5w1s`` (needs ``--data-root``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (the workloads and peers' implementations, shared with the throughput table)

# (label, implementation in throughput.IMPLS, --threads: 0 = the trainer's choice / a peer's torch default)
ROWS = [("mamlkit, --threads 0 (default)", "mamlkit", 0), ("mamlkit, --threads 2", "mamlkit", 2),
        ("learn2learn", "learn2learn", 0)]


def _set_threads(impl: str, threads: int) -> str:
    """Apply the row's thread setting as its user would get it; returns it in words."""
    if impl.startswith("mamlkit"):
        from mamlkit.exec import threads as plan

        chosen = plan.choose(threads)
        plan.apply(chosen)
        return f"{chosen.intra_op} intra-op, {chosen.task_workers} task workers"
    if threads:
        torch.set_num_threads(threads)
    return f"{torch.get_num_threads()} intra-op"


def child(impl: str, name: str, threads: int, phase_s: float, rounds: int, warmup: int) -> dict:
    said = _set_threads(impl, threads)
    w = throughput.workload(name) | {"name": name}
    model = throughput.workload_model(name)
    data = throughput.workload_data(name, 20)
    step = throughput.IMPLS[impl](model, w | {"first_batch": data[0]})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    i = 0

    def one() -> None:
        nonlocal i
        opt.zero_grad(set_to_none=True)
        step(data[i % len(data)])
        opt.step()
        i += 1

    for _ in range(warmup):
        one()
    phases: dict[str, list[float]] = {"quiet": [], "loaded": []}
    for _ in range(rounds):
        for phase in ("quiet", "loaded"):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if phase == "loaded" else None
            try:
                if busy:
                    time.sleep(0.5)  # let it take its core
                n, start = 0, time.perf_counter()
                while n < 2 or time.perf_counter() - start < phase_s:
                    one()
                    n += 1
                phases[phase].append(n / (time.perf_counter() - start))
            finally:
                if busy:
                    busy.kill()
                    busy.wait()
    strategy = throughput.CHOSEN.get("strategy", "")
    return {"threads": said, "strategy": strategy, **phases}


# --- every entry point, quiet and beside a busy process ----------------------------------------------------

# The other job: matrix products on every core, as a user's other torch work would run.
BUSY = ("import os, torch\ntorch.set_num_threads(os.cpu_count() or 1)\na = torch.randn(512, 512)\n"
        "while True:\n    a @ a\n")

# The README's Python API loop (auto strategy, its trial included), timed in its process.
API_TRAIN = """
import time, torch, mamlkit
from mamlkit.models import mlp
from mamlkit.tasks import Sinusoid, task_generator
model = mlp(1, (40, 40), 1)
learner = mamlkit.MAML(model, inner_lr=0.01, inner_steps=1, loss_fn="mse")
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
tasks = Sinusoid(k_support=10, k_query=10)
start = time.perf_counter()
for step in range({steps}):
    batch = tasks.sample(25, task_generator(seed=0, split="train", index=step))
    opt.zero_grad()
    loss, metrics = learner.meta_loss(batch)
    loss.backward()
    opt.step()
print("SECONDS", time.perf_counter() - start)
"""

API_ADAPT = """
import time, torch, mamlkit
from mamlkit.tasks import Sinusoid, task_generator
learner = mamlkit.load({run!r})
task = Sinusoid(k_support=10, k_query=10).sample(1, task_generator(seed=0, split="test", index=0))
start = time.perf_counter()
for _ in range({calls}):
    learner.adapt(task.support_x[0], task.support_y[0], steps=100)
print("SECONDS", time.perf_counter() - start)
"""


def _commands(tmp: str, quick: bool) -> dict[str, list[str]]:
    """Each entry point's command, sized to take a few seconds quiet on 2 cores (less with ``quick``)."""
    import mamlkit

    cli = [sys.executable, "-m", "mamlkit"]
    run = os.path.join(tmp, "base", "sinusoid-maml")
    nav2d = os.path.join(os.path.dirname(mamlkit.__file__), "assets", "nav2d-maml-trpo.safetensors")
    small = {"iterations": 50 if quick else 200, "eval_tasks": 10 if quick else 50, "steps": 500 if quick else 2000,
             "rl_tasks": 3 if quick else 10, "traj": 10 if quick else 30, "api_steps": 30 if quick else 120,
             "calls": 5 if quick else 20}
    return {
        "mamlkit train": cli + ["train", "sinusoid", "--iterations", str(small["iterations"]), "--val-tasks", "0",
                                "--eval-tasks", str(small["eval_tasks"]), "--eval-shots", "5", "10",
                                "--no-compare-pretrained", "--strategy", "vmap", "--no-progress", "--no-tensorboard",
                                "--out-dir", os.path.join(tmp, "train"), "--run-name", "r", "--overwrite"],
        "mamlkit eval": cli + ["eval", run, "--eval-tasks", "100" if quick else "600", "--out",  # 600: the default
                               os.path.join(tmp, "eval"), "--overwrite"],
        "mamlkit adapt": cli + ["adapt", run, "--support", os.path.join(tmp, "support.csv"), "--query",
                                os.path.join(tmp, "query.csv"), "--steps", str(small["steps"]), "--output",
                                os.path.join(tmp, "predictions.csv")],
        "mamlkit rl eval": cli + ["rl", "eval", nav2d, "--eval-tasks", str(small["rl_tasks"]), "--eval-traj", "20",
                                  "--no-baselines", "--out", os.path.join(tmp, "rl"), "--overwrite"],
        "mamlkit rl adapt": cli + ["rl", "adapt", "nav2d", "--goal", "0.3", "-0.2", "--steps", "3", "--traj",
                                   str(small["traj"]), "--out", os.path.join(tmp, "nav2d.png")],
        "Python API: meta-training loop": [sys.executable, "-c", API_TRAIN.format(steps=small["api_steps"])],
        "Python API: load(RUN).adapt": [sys.executable, "-c", API_ADAPT.format(run=run, calls=small["calls"])],
    }


# the rows, in the order of _commands
ENTRY_POINTS = [
    "mamlkit train", "mamlkit eval", "mamlkit adapt", "mamlkit rl eval", "mamlkit rl adapt",
    "Python API: meta-training loop", "Python API: load(RUN).adapt"]


def _setup(tmp: str) -> None:
    """The run that eval and adapt load, and a regression task's support and query CSVs."""
    import math

    # the preset's evaluation (K = 5, 10, 20; 10 steps), which `mamlkit eval` repeats on more tasks
    cmd = [sys.executable, "-m", "mamlkit", "train", "sinusoid", "--iterations", "50", "--val-tasks", "0",
           "--eval-tasks", "10", "--no-compare-pretrained", "--strategy", "vmap", "--no-progress",
           "--no-tensorboard", "--out-dir", os.path.join(tmp, "base")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    xs = [-5 + 10 * i / 99 for i in range(100)]
    with open(os.path.join(tmp, "support.csv"), "w") as f:
        f.write("x,y\n" + "".join(f"{x:.4f},{2 * math.sin(x - 0.5):.4f}\n" for x in xs))
    with open(os.path.join(tmp, "query.csv"), "w") as f:
        f.write("x\n" + "".join(f"{x + 0.05:.4f}\n" for x in xs))


def _timed(cmd: list[str], busy: bool) -> float:
    """Seconds of ``cmd``: the ``SECONDS`` it prints (an API row's calls), else its whole process; with
    ``busy``, beside the busy process."""
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        if hog:
            time.sleep(0.5)  # let it take the cores
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - start
    finally:
        if hog:
            hog.kill()
            hog.wait()
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1][:160])
    said = [ln for ln in proc.stdout.splitlines() if ln.startswith("SECONDS ")]
    return float(said[-1].split()[1]) if said else wall


def entry_points(args: argparse.Namespace) -> None:
    import tempfile

    rounds = args.rounds or 1
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; each row quiet, then beside one process running "
          f"matrix products on every core, {rounds} round(s), median seconds; load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| entry point | quiet s | busy s | busy / quiet speed |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="mamlkit-contention-") as tmp:
        _setup(tmp)
        commands = _commands(tmp, args.quick)
        for name in args.entries:
            try:
                times = {"quiet": [], "busy": []}
                for _ in range(rounds):
                    for phase in ("quiet", "busy"):
                        times[phase].append(_timed(commands[name], phase == "busy"))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"| {name} | failed: {e} | | |", flush=True)
                continue
            quiet, busy = statistics.median(times["quiet"]), statistics.median(times["busy"])
            ratio = quiet / busy
            print(f"| {name} | {quiet:.2f} | {busy:.2f} | **{ratio:.2f}**{' (below 0.5)' * (ratio < 0.5)} |",
                  flush=True)
    print(f"\nload average at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--training", action="store_true",
                    help="the meta-training throughput table per implementation instead of the entry points")
    ap.add_argument("--quick", action="store_true", help="entry points: smaller workloads, one round")
    ap.add_argument("--entries", nargs="+", choices=list(ENTRY_POINTS), default=list(ENTRY_POINTS),
                    help="entry points to time (default: all)")
    ap.add_argument("--workloads", nargs="+", default=["sinusoid", "omniglot-5w1s"],
                    choices=["sinusoid", "omniglot-5w1s"])
    ap.add_argument("--rows", nargs="+", default=[label for label, _, _ in ROWS],
                    help="which rows to run (labels as printed)")
    ap.add_argument("--phase-s", type=float, default=8.0, help="seconds per timed phase")
    ap.add_argument("--rounds", type=int, default=0,
                    help="quiet/loaded pairs per row (default: 3 for --training, 1 for the entry points)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up iterations (default: 30 sinusoid, 3 omniglot)")
    ap.add_argument("--data-root", default="", help="dataset root for omniglot-5w1s (sets MAMLKIT_BENCH_DATA)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.data_root:
        os.environ["MAMLKIT_BENCH_DATA"] = args.data_root
    if not args.training and not args.child:
        entry_points(args)
        return
    args.rounds = args.rounds or 3
    if args.child:
        impl, name, threads = json.loads(args.child)
        warmup = args.warmup or (30 if name == "sinusoid" else 3)
        print("RESULT " + json.dumps(child(impl, name, threads, args.phase_s, args.rounds, warmup)))
        return
    if "omniglot-5w1s" in args.workloads and not os.environ.get("MAMLKIT_BENCH_DATA"):
        ap.error("omniglot-5w1s needs --data-root (the folder that holds omniglot/)")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.rounds} rounds of {args.phase_s:.0f} s quiet "
          f"+ {args.phase_s:.0f} s beside one busy process; load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name in args.workloads:
        print(f"\n| {name} | threads | strategy | quiet it/s | loaded it/s | loaded / quiet |")
        print("|---|---|---|---|---|---|")
        for label, impl, threads in ROWS:
            if label not in args.rows:
                continue
            if impl == "learn2learn":
                try:
                    throughput._import_l2l_maml()
                except ImportError:
                    print(f"| {label} | not installed | | | | |")
                    continue
            cmd = [sys.executable, __file__, "--child", json.dumps([impl, name, threads]),
                   "--phase-s", str(args.phase_s), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"| {label} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:100]} | | | | |")
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            quiet, loaded = statistics.median(r["quiet"]), statistics.median(r["loaded"])
            print(f"| {label} | {r['threads']} | {r['strategy'] or '—'} | {quiet:.1f} | {loaded:.1f} | "
                  f"{loaded / quiet:.2f} |", flush=True)
    print(f"\nload average at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
