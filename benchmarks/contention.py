"""Meta-training throughput on a quiet machine against beside one competing CPU-bound process, in one run.

A user's laptop or a shared node is rarely idle. This measures how much of its quiet throughput each
implementation keeps when one other process (``python -c "while True: pass"``) holds a core:

    python benchmarks/contention.py --data-root ../shared/data

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["sinusoid", "omniglot-5w1s"],
                    choices=["sinusoid", "omniglot-5w1s"])
    ap.add_argument("--rows", nargs="+", default=[label for label, _, _ in ROWS],
                    help="which rows to run (labels as printed)")
    ap.add_argument("--phase-s", type=float, default=8.0, help="seconds per timed phase")
    ap.add_argument("--rounds", type=int, default=3, help="quiet/loaded pairs per implementation")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up iterations (default: 30 sinusoid, 3 omniglot)")
    ap.add_argument("--data-root", default="", help="dataset root for omniglot-5w1s (sets MAMLKIT_BENCH_DATA)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.data_root:
        os.environ["MAMLKIT_BENCH_DATA"] = args.data_root
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
