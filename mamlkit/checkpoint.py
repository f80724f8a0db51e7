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
    text = meta.get("format_version", "0")
    if not text.isdigit():
        raise CheckpointError(f"{path}: its format_version is {text!r}, not a whole number; the file is damaged "
                              "or was not written by mamlkit")
    version = int(text)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this mamlkit "
                              f"understands ({FORMAT_VERSION}); upgrade mamlkit (pip install -U mamlkit).")
    if "state" not in meta:
        raise CheckpointError(f"{path} has no 'state' record (the run's JSON description); the file is damaged "
                              "or was not written by mamlkit")
    try:
        state = json.loads(meta["state"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its 'state' record is not JSON ({e}); the file is damaged") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its 'state' record is a JSON {type(state).__name__}, not an object; the "
                              "file is damaged or was not written by mamlkit")
    return tensors, state


def config_of(state: dict[str, Any], path: str | Path):
    """The run config a checkpoint's ``state`` describes; a missing or malformed one is a CheckpointError."""
    from mamlkit import config

    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} holds no run config (state['config']); it cannot be loaded as a run")
    try:
        return config.from_dict(state["config"])
    except UserError as e:
        raise CheckpointError(f"{path}: its run config is invalid: {e}") from None


def check_tensors(tensors: dict[str, Tensor], prefix: str, expected: dict[str, Tensor], *,
                  required: bool = True, where: str = "checkpoint") -> None:
    """Check that ``tensors`` holds ``prefix + name`` for every ``expected`` tensor with exactly its shape and
    a floating dtype (or exactly its dtype when it is not floating), and nothing else under ``prefix``.

    A checkpoint tensor that would merely broadcast (``[40]`` for a ``[40, 40]`` weight) loads silently
    with ``copy_``; this refuses it, naming every mismatch. ``required=False``: absent names are allowed.
    """
    problems = []
    for name, ref in expected.items():
        t = tensors.get(prefix + name)
        if t is None:
            if required:
                problems.append(f"{prefix}{name} is missing")
        elif tuple(t.shape) != tuple(ref.shape):
            problems.append(f"{prefix}{name} has shape {list(t.shape)}, the model's is {list(ref.shape)}")
        elif t.dtype != ref.dtype and not (t.dtype.is_floating_point and ref.dtype.is_floating_point):
            problems.append(f"{prefix}{name} has dtype {t.dtype}, the model's is {ref.dtype}")
    extra = sorted(k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in expected)
    problems += [f"{k} is not a tensor of this model" for k in extra[:3]]
    if problems:
        raise CheckpointError(f"the {where} does not fit the model it describes: {'; '.join(problems[:5])}"
                              f"{' ...' if len(problems) > 5 else ''}. It was written for another model or "
                              "algorithm, or it is damaged.")


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], state: dict[str, Any],
                   path: str | Path) -> None:
    """Load a checkpoint's optimiser state into ``optimizer`` after checking it fits the parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        opt = optimizer_state(tensors, state["optimizer"])
        for idx, st in opt["state"].items():
            for key, value in st.items():
                if isinstance(value, Tensor) and value.dim() and value.shape != params[idx].shape:
                    raise ValueError(f"optim/{idx}/{key} has shape {list(value.shape)}, its parameter's is "
                                     f"{list(params[idx].shape)}")
        optimizer.load_state_dict(opt)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: its optimiser state does not fit the model ({e}); the file is damaged or "
                              "was written for another model") from None


def check_rng(t: Tensor, path: str | Path) -> Tensor:
    """A checkpoint's ``rng/torch`` tensor, checked to be a torch CPU generator state."""
    if t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{path}: rng/torch is not a torch RNG state ({t.dtype}, {list(t.shape)}); the file "
                              "is damaged")
    return t


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
