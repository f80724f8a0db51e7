"""Shared test utilities: flattening and central finite differences in float64."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# The compiled kernels' tests (without a C compiler, mamlkit.exec.kernels falls back to torch; tested too).
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: mamlkit.exec.kernels falls back to torch")


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def finite_difference_grad(fn, params: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Central differences of scalar ``fn()`` w.r.t. every entry of ``params`` (perturbed in place)."""
    grads = []
    with torch.no_grad():
        for p in params:
            g = torch.zeros_like(p).reshape(-1)
            view = p.view(-1)
            for i in range(view.numel()):
                old = view[i].item()
                view[i] = old + eps
                plus = fn().item()
                view[i] = old - eps
                minus = fn().item()
                view[i] = old
                g[i] = (plus - minus) / (2 * eps)
            grads.append(g)
    return torch.cat(grads)


def write_csv(path, header, rows):
    """Write ``header`` and ``rows`` as a CSV file; returns ``path``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def copy_repository(dest: Path) -> Path:
    """The files a clone of the current tree holds (tracked, or new and not ignored), copied to ``dest``:
    what a user gets, without build outputs, virtual environments or data lying beside the checkout."""
    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = root / name
        if src.is_file():  # a deleted but still tracked file is not in a clone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def config_flags(values: dict) -> list[str]:
    """Config values as the command-line flags that set them (``--no-x`` for a false bool, tuples spread)."""
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return out
