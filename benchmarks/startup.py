"""Start-up time of the command line: `mamlkit --help`, `mamlkit presets` and `mamlkit train PRESET --help`
against `python -c "import torch"`, each a fresh process, median of --repeats interleaved runs.

    python benchmarks/startup.py [--repeats 7]

Prints a markdown table: seconds per command and the difference to torch's import.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c 'import torch'": ["-c", "import torch"],
    "mamlkit --help": ["-m", "mamlkit", "--help"],
    "mamlkit presets": ["-m", "mamlkit", "presets"],
    "mamlkit train omniglot-5w1s --help": ["-m", "mamlkit", "train", "omniglot-5w1s", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # interleaved: a busy moment on a shared machine hits every command alike
        for name, argv in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    torch_s = statistics.median(times["python -c 'import torch'"])
    print("| command | median s | minus torch import s |\n|---|---|---|")
    for name, t in times.items():
        print(f"| `{name}` | {statistics.median(t):.2f} | {statistics.median(t) - torch_s:+.2f} |")


if __name__ == "__main__":
    main()
