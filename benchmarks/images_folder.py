"""`mamlkit train images` on a plain folder of Omniglot's evaluation characters, beside `mamlkit train
omniglot-5w1s`, both for the same wall-clock budget.

1. Unpacks ``images_evaluation.zip`` into ``OUT/folder/<Alphabet>-<characterNN>/*.png``: 659 classes of 20
   drawings, a plain class-folder layout such as a user's own data.
2. Builds both preprocessing caches first (not part of the budget).
3. Starts both trainings at once, ``--threads 1`` each, stops each with SIGTERM after ``--budget`` seconds
   (the trainer checkpoints on SIGTERM), and evaluates both checkpoints with ``mamlkit eval`` on
   ``--eval-tasks`` fixed test tasks of its held-out classes.

``images`` runs with omniglot-5w1s's learning settings (α=0.4, 1 step train / 3 test, meta-batch 32, one
query per class, 64 filters) on 28×28 grey images, so the two differ in their data pipelines: the folder
family's 461/99/99 split of the 659 evaluation characters, max-pool Conv4, no rotations and dark strokes,
against the Omniglot family's 1100/100/423 split of all 1623 characters, stride-2 Conv4 with rotations.
Their test classes differ too (99 of the evaluation characters against 423 of all characters).

    python benchmarks/images_folder.py --data-root DATA/omniglot --budget 540 --out /tmp/images-bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEARNING = ["--inner-lr", "0.4", "--inner-steps", "1", "--test-inner-steps", "3", "--meta-batch", "32",
            "--k-query", "1", "--filters", "64", "--val-every", "2000"]


def build_folder(zip_path: Path, dest: Path) -> int:
    """One folder per character (``<Alphabet>-<characterNN>``) from the zip; returns the number of classes."""
    if dest.is_dir():
        return sum(1 for _ in dest.iterdir())
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.namelist():
            parts = member.split("/")
            if member.endswith(".png") and len(parts) == 4:
                target = tmp / f"{parts[1]}-{parts[2]}" / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
    tmp.rename(dest)
    return sum(1 for _ in dest.iterdir())


def mamlkit(*args: str, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "mamlkit", *args], env=env, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("MAMLKIT_DATA", ""), help="folder of the Omniglot zips")
    p.add_argument("--budget", type=float, default=540, help="seconds of training for each run")
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--out", default="images-bench", help="work folder (image folder, caches, runs)")
    a = p.parse_args()

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAMLKIT_CACHE": str(out / "cache")}
    zips = Path(a.data_root).expanduser()
    zips = zips / "omniglot" if not (zips / "images_evaluation.zip").is_file() else zips
    folder = out / "folder"
    classes = build_folder(zips / "images_evaluation.zip", folder)
    print(f"{folder}: {classes} class folders")
    common = ["--threads", "1", "--no-progress", "--no-tensorboard", "--iterations", "1000000",
              "--out-dir", str(out / "runs"), "--overwrite", "--checkpoint-every", "1000000"]
    runs = {
        "images": ["train", "images", "--path", str(folder), "--channels", "1", "--image-size", "28", *LEARNING,
                   "--run-name", "images", *common],
        "omniglot-5w1s": ["train", "omniglot-5w1s", "--data-root", str(zips), "--run-name", "omniglot", *common],
    }
    # preprocessing caches first, outside the budget
    subprocess.run([sys.executable, "-c", "from mamlkit.tasks import images; "
                    f"images.load_folder({str(folder)!r}, 28, 1, progress=False)"], env=env, check=True)
    subprocess.run([sys.executable, "-m", "mamlkit", "data", "omniglot", "--data-root", str(zips), "--no-download"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    procs = {name: mamlkit(*args, env=env, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)
             for name, args in runs.items()}
    start = time.monotonic()
    time.sleep(a.budget)
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        proc.wait()
    print(f"trained {time.monotonic() - start:.0f} s each, both at once, one thread each")
    rows = []
    for name, folder_name in (("images", "images"), ("omniglot-5w1s", "omniglot")):
        run = out / "runs" / folder_name
        stopped = re.search(r"stopped by \w+ at step (\d+)", (out / f"{name}.log").read_text())
        subprocess.run([sys.executable, "-m", "mamlkit", "eval", str(run), "--eval-tasks", str(a.eval_tasks),
                        "--overwrite"], env=env, check=True, stdout=subprocess.DEVNULL)
        acc = json.loads((run / "eval.json").read_text())["accuracy"]["maml"]
        last = max(acc, key=int)
        rows.append(f"| {name} | {stopped.group(1) if stopped else '?'} | {100 * acc[last]['mean']:.2f} ± "
                    f"{100 * acc[last]['ci95']:.2f} ({last} steps) |")
    print("| run | iterations | test accuracy (%), 5-way 1-shot, 95% CI |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
