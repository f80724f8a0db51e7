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
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import platform
import time
from pathlib import Path

import torch


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="/tmp/bench-tabular")
    args = parser.parse_args()
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
