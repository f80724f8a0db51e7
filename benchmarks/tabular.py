"""Tasks from a CSV on a real public data set: World Bank fertility rates, a task per country.

The data ship inside the statsmodels wheel (``statsmodels/datasets/fertility/fertility.csv``, World
Bank indicator SP.DYN.TFRT.IN, total births per woman, 1960-2013, 219 countries and regional
aggregates; World Bank terms of use, see statsmodels' ``fertility/data.py``). Nothing is downloaded:
the file is read from the installed package (extra ``tabular``). The wide file (a column per year) is
written out long as ``country,year,fertility`` (empty cells kept empty), and the run uses
``--fill drop`` for the years a country has no value. A task is one country's curve: predict the
fertility rate of 10 query years from 5 support years (few-shot regression, as the sinusoid).

Runs ``mamlkit train csv`` (MAML, with the pooled ``pretrain`` baseline) and prints the report, which
also scores a per-task MLP trained from scratch on the 5 support rows.

    .venv/bin/python benchmarks/tabular.py --iterations 5000 --out-dir /tmp/bench-tabular

``--memory``: the memory and time of reading a large CSV task file instead. A generated file of store sales
(``--mb``, default 200; ``store,price,temp,promo,region,sales``, about 250 rows per store) is read into tasks
(``load_csv``, then the meta-train episode index and one batch), each time in a fresh process. Peak RSS growth
(VmHWM, Linux) is measured from the process after its imports (cold) and after reading a small file first
(warm: pyarrow's one-time costs, its compute kernels and reader threads, not counted), over the file's size.
``--baseline REV`` also runs the tabular module of git revision REV on the same file, interleaved:

    .venv/bin/python benchmarks/tabular.py --memory --mb 200 --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def fertility_csv(dest: Path) -> Path:
    """Write statsmodels' World Bank fertility table in long form ``country,year,fertility`` to ``dest``."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark needs the statsmodels package: pip install 'mamlkit[tabular]'")
    src = Path(spec.submodule_search_locations[0]) / "datasets" / "fertility" / "fertility.csv"
    with open(src, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    years = header[4:]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["country", "year", "fertility"])
        for r in rows[1:]:
            for year, value in zip(years, r[4:]):
                w.writerow([r[0], year, value])
    return dest


def sales_csv(dest: Path, mb: float, seed: int = 0) -> Path:
    """Write a CSV of at least ``mb`` MiB of store sales: blocks of 50,000 rows over 200 new stores each; price,
    temperature and sales normal, promo 0/1, region one of four words (a one-hot feature)."""
    rng = np.random.default_rng(seed)
    regions = np.array(["north", "south", "east", "west"])
    with open(dest, "w") as f:
        f.write("store,price,temp,promo,region,sales\n")
        part = 0
        while f.tell() < mb * 2**20:
            n = 50_000
            cols = (rng.integers(0, 200, n) + 200 * part, rng.normal(10, 2, n), rng.normal(15, 8, n),
                    rng.integers(0, 2, n), regions[rng.integers(0, 4, n)], rng.normal(100, 20, n))
            f.write("".join(f"s{a},{b:.4f},{c:.3f},{d},{e},{g:.3f}\n" for a, b, c, d, e, g in zip(*cols)))
            part += 1
    return dest


# One measurement in a fresh process: argv = file, warm-up file or "-", tabular module file or "-" (this tree's).
MEASURE = """
import importlib.util, json, sys, time
import torch, pyarrow, pyarrow.csv
from mamlkit.tasks import tabular
if sys.argv[3] != "-":
    spec = importlib.util.spec_from_file_location("tabular_baseline", sys.argv[3])
    tabular = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tabular)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def tasks(path):
    data = tabular.load_csv(path, "store", "sales", min_rows=15)
    tabular.CSVTasks(data, "train", 5, 10).sample(4, torch.Generator().manual_seed(0))
    return len(data.y)

if sys.argv[2] != "-":
    tasks(sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from here
base, start = status("VmRSS"), time.perf_counter()
rows = tasks(sys.argv[1])
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start, "grown": status("VmHWM") - base}))
"""


def memory(args) -> None:
    """Peak RSS growth over the file's size and wall time of reading a generated file, cold and warm, for this
    tree and (``--baseline``) another revision's tabular module, interleaved."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sales-{args.mb:g}mb.csv"
    if not path.exists():
        sales_csv(path, args.mb)
    warm = out / "sales-warm.csv"
    with open(path) as f:
        warm.write_text("".join(next(f) for _ in range(8000)))
    modules = {"this tree": "-"}
    if args.baseline:
        sha = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        source = subprocess.run(["git", "show", f"{sha}:mamlkit/tasks/tabular.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
        (out / f"tabular-{sha}.py").write_text(source)
        modules = {f"{args.baseline} ({sha})": str(out / f"tabular-{sha}.py"), **modules}
    size = path.stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results: dict[tuple[str, str], dict] = {}
    for mode in ("cold", "warm"):
        for name, module in modules.items():
            run = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(warm) if mode == "warm" else "-",
                                  module], env=env, capture_output=True, text=True, check=True)
            results[name, mode] = json.loads(run.stdout.splitlines()[-1])
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores; {path.name}: "
          f"{size / 1e6:.1f} MB, {results['this tree', 'cold']['rows']:,} rows")
    print("| tabular module | peak RSS growth, cold | after a warm-up | wall s (cold) |\n|---|---|---|---|")
    for name in modules:
        cold, hot = results[name, "cold"], results[name, "warm"]
        print(f"| {name} | {cold['grown'] / 1e6:.0f} MB = {cold['grown'] / size:.2f}x | "
              f"{hot['grown'] / 1e6:.0f} MB = {hot['grown'] / size:.2f}x | {cold['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="/tmp/bench-tabular")
    parser.add_argument("--memory", action="store_true", help="measure reading a large CSV (see above)")
    parser.add_argument("--mb", type=float, default=200, help="--memory: the generated file's size in MiB")
    parser.add_argument("--baseline", help="--memory: also the tabular module of this git revision")
    args = parser.parse_args()
    if args.memory:
        return memory(args)
    torch.set_num_threads(args.threads)
    from mamlkit.cli import main as cli

    out = Path(args.out_dir)
    path = fertility_csv(out / "fertility_long.csv")
    argv = ["train", "csv", "--path", str(path), "--task-column", "country", "--target", "fertility",
            "--fill", "drop", "--iterations", str(args.iterations), "--eval-tasks", str(args.eval_tasks),
            "--threads", str(args.threads), "--out-dir", str(out), "--run-name", f"fertility-{int(time.time())}",
            "--no-progress", "--no-tensorboard"]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}, "
          f"command: mamlkit {' '.join(argv)}")
    start = time.perf_counter()
    code = cli(argv)
    print(f"exit {code}, wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
