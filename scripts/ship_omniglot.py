"""Build the pretrained Omniglot model and example task that ship inside the package.

    python scripts/ship_omniglot.py RUN_DIR [--data-root DATA/omniglot]

1. Writes ``mamlkit/assets/omniglot-5w1s.safetensors``: RUN_DIR's meta-parameters, buffers and config,
   without optimiser state (loading needs none).
2. Writes ``mamlkit/assets/examples/omniglot/{support,query}``: the original 105×105 PNGs of 5
   characters of the evaluation zip that are in the *test* split (never seen in meta-training),
   one drawing each as support and three others each as query, in the ImageFolder layout.
"""

from __future__ import annotations

import argparse
import shutil
import zipfile
from pathlib import Path

from mamlkit import checkpoint
from mamlkit.data import ensure_omniglot, load_omniglot
from mamlkit.tasks.omniglot import split_indices

ASSETS = Path(__file__).resolve().parents[1] / "mamlkit" / "assets"


def slim_checkpoint(run_dir: Path) -> None:

    checkpoint.slim(run_dir, ASSETS / "omniglot-5w1s.safetensors")


def example_set(data_root: str, classes: int = 5, queries: int = 3) -> None:
    folder = ensure_omniglot(data_root or None, progress=False)
    data = load_omniglot(data_root or None, progress=False)
    test = [data.names[i] for i in split_indices(data.names, "paper")["test"].tolist()]
    chosen, alphabets = [], set()
    for name in test:  # one character per alphabet, evaluation zip only
        _, alphabet, _ = name.split("/")
        if name.startswith("images_evaluation/") and alphabet not in alphabets:
            chosen.append(name)
            alphabets.add(alphabet)
        if len(chosen) == classes:
            break
    out = ASSETS / "examples" / "omniglot"
    shutil.rmtree(out, ignore_errors=True)
    with zipfile.ZipFile(Path(folder) / "images_evaluation.zip") as zf:
        members = sorted(n for n in zf.namelist() if n.endswith(".png"))
        for name in chosen:
            _, alphabet, char = name.split("/")
            label = f"{alphabet}_{char}"
            drawings = [m for m in members if m.startswith(name + "/")]
            (out / "support" / label).mkdir(parents=True)
            (out / "query").mkdir(parents=True, exist_ok=True)
            (out / "support" / label / Path(drawings[0]).name).write_bytes(zf.read(drawings[0]))
            for j, m in enumerate(drawings[1:1 + queries]):
                (out / "query" / f"{label}__{j}.png").write_bytes(zf.read(m))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--data-root", default="")
    args = ap.parse_args()
    if args.run_dir:
        slim_checkpoint(Path(args.run_dir))
    example_set(args.data_root)


if __name__ == "__main__":
    main()
