"""Checkpoints: one safetensors file whose header carries the run's JSON state.

Nothing in a checkpoint runs code on load: tensors are safetensors, everything else is JSON
in the file's metadata. Files are written to a temporary name, fsynced, then renamed over
the target, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mamlkit.base.errors import UserError

FORMAT = "mamlkit"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """The file is missing, not a mamlkit checkpoint, or of a newer format."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON."""
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()`` from :func:`optimizer_tensors`' output."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(path: str | Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Write ``tensors`` and the JSON-able ``state`` atomically to ``path``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(state)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint: ``(tensors, state)``. Raises :class:`CheckpointError` with the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Pass a run folder or a .safetensors file "
                              "written by `mamlkit train`.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}); mamlkit checkpoints are written "
                              "by `mamlkit train`.") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a mamlkit checkpoint (no mamlkit "
                              "metadata); mamlkit loads only checkpoints written by `mamlkit train`.")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this mamlkit "
                              f"understands ({FORMAT_VERSION}); upgrade mamlkit (pip install -U mamlkit).")
    return tensors, json.loads(meta["state"])


def rng_tensor() -> Tensor:
    """The global torch RNG state, saved so that user models with dropout resume exactly."""
    return torch.get_rng_state()


def slim(src: str | Path, dest: str | Path) -> None:
    """Write ``src``'s meta-parameters, buffers and model description to ``dest`` without the optimiser
    and RNG state or local paths: the form in which a model ships (``mamlkit/assets``)."""
    tensors, state = load(src)
    keep = {k: v for k, v in tensors.items() if k.startswith(("meta/", "buffer/"))}
    meta = {k: state[k] for k in ("config", "model_spec", "algo", "kind", "step")}
    meta["config"] = {**meta["config"], "data_root": "", "out_dir": "runs", "run_name": ""}
    save(dest, keep, meta)
