"""Checkpoints: one safetensors file whose header carries the run's JSON state.

Nothing in a checkpoint runs code on load: tensors are safetensors, everything else is JSON
in the file's metadata. Files are written to a temporary name, fsynced, then renamed over
the target, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.base.limits import MAX_STATE_BYTES, MAX_STATE_DEPTH

FORMAT = "mamlkit"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """The file is missing, not a mamlkit checkpoint, of a newer format, damaged, or malformed (see :func:`load`)."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the disk, or the user's quota, is full


def os_error_of(e: BaseException) -> OSError | None:
    """The operating system's error behind ``e``: ``e`` itself for an ``OSError``; for safetensors' own
    ``SafetensorError``, which wraps a failed write as text ("I/O error: No space left on device (os error
    28)"), an ``OSError`` with that errno; otherwise ``None``."""
    if isinstance(e, OSError):
        return e
    found = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a new temporary file in ``path``'s folder, fsync it, then rename it over
    ``path``: ``path`` is the old file or the new one, never a mix. On any failure the temporary file is
    removed; a full disk (also as safetensors reports it, and any other system error safetensors wraps)
    raises an ``OSError`` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        err = os_error_of(e)
        if err is None or (err is e and err.errno not in NO_SPACE):
            raise
        # OSError(errno, ...) is the errno's subclass (PermissionError for EACCES), as Python raises it
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 (names that are not UTF-8, kept as surrogates, backslash-escaped) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="backslashreplace"))


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


def tensor_digest(values: Tensor | np.ndarray) -> str:
    """sha256 of ``values``' bytes in C order (a tensor of any dtype and shape, or a numpy array)."""
    if isinstance(values, Tensor):
        values = values.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(np.ascontiguousarray(values).reshape(-1).view(np.uint8)).hexdigest()


# The metadata record of every tensor's dtype, shape and sha256, written with the tensors and checked on load.
DIGESTS = "tensors_sha256"


def _describe(t: Tensor) -> list:
    return [str(t.dtype).removeprefix("torch."), list(t.shape)]


def save(path: str | Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Write ``tensors`` and the JSON-able ``state`` atomically to ``path``, with each tensor's dtype, shape
    and sha256 (:data:`DIGESTS`), so that :func:`load` notices a tensor changed since (one flipped bit)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digests = {k: [*_describe(v), tensor_digest(v)] for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(state),
            DIGESTS: json.dumps(digests)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint: ``(tensors, state)``, validated before anything uses them. Raises
    :class:`CheckpointError` with the fix.

    Checked here, for every kind of mamlkit file (training and meta-RL checkpoints, adapted models, shipped
    models): the format and its version; the JSON state's size, nesting depth, finite numbers and the types
    of its known fields (:func:`check_state`); each tensor against the digest recorded when it was written
    (:func:`check_digests`; files written before digests were recorded load without this check); and that
    every tensor is finite (:func:`check_finite`). Whether the tensors fit the model is the caller's to
    check, with :func:`check_tensors`.
    """
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
    state = parse_record(meta["state"], "state", path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its 'state' record is a JSON {type(state).__name__}, not an object; the "
                              "file is damaged or was not written by mamlkit")
    check_state(state, path)
    check_digests(tensors, meta, path)
    check_finite(tensors, path)
    return tensors, state


def json_depth(value: Any) -> int:
    """How deep the JSON ``value``'s arrays and objects nest (``{}``: 1), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_record(text: str, what: str, path: str | Path) -> Any:
    """The JSON record ``what`` of the checkpoint ``path``, after checking its size (MAX_STATE_BYTES), its
    depth (MAX_STATE_DEPTH) and that every number in it is finite (a stored NaN or infinity is named)."""
    damaged = "the file is damaged or was not written by mamlkit"
    if len(text) > MAX_STATE_BYTES:
        raise CheckpointError(f"{path}: its {what!r} record is {len(text) / 2**20:.1f} MiB, above the limit of "
                              f"{MAX_STATE_BYTES // 2**20} MiB; {damaged}")
    too_deep = CheckpointError(f"{path}: its {what!r} record nests arrays or objects more than {MAX_STATE_DEPTH} "
                               f"levels deep; {damaged}")
    try:
        value = json.loads(text)
    except RecursionError:  # json's parser recurses once per level and stops, unharmed, at the interpreter's limit
        raise too_deep from None
    except ValueError as e:
        raise CheckpointError(f"{path}: its {what!r} record is not JSON ({e}); the file is damaged") from None
    if json_depth(value) > MAX_STATE_DEPTH:  # before anything walks it recursively
        raise too_deep
    bad = non_finite(value)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad[0]} in its {what!r} record is {bad[1]}, not a finite number; a run "
                              f"stores only finite settings and values, so {damaged}")
    return value


def non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """``(field, number)`` of the first NaN or infinite number in the JSON ``value`` (``config.inner_lr``,
    ``model_spec.hidden[1]``), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "the value", value)
    items = (value.items() if isinstance(value, dict) else
             ((f"[{i}]", v) for i, v in enumerate(value)) if isinstance(value, list) else ())
    for key, v in items:
        found = non_finite(v, f"{where}{key}" if key.startswith("[") else f"{where}.{key}" if where else key)
        if found is not None:
            return found
    return None


_OBJECT, _NULL = (dict,), (type(None),)
# The JSON types of the top-level fields of a checkpoint's state, where present (training checkpoints:
# config, model_spec, algo, kind, step, optimizer, strategy; meta-RL ones: best_val, val_return_*; adapted
# models: type, input, num_classes, class_names). Other fields pass: they are read, if at all, by their owner.
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "config": _OBJECT, "model_spec": _OBJECT + _NULL, "optimizer": _OBJECT, "tuned_inner_lr": _OBJECT,
    "algo": (str,), "kind": (str,), "type": (str,), "strategy": (str,) + _NULL, "step": (int,),
    "input": _OBJECT + _NULL, "num_classes": (int,) + _NULL, "class_names": (list,) + _NULL,
    "best_val": (int, float) + _NULL, "val_return_pre": (int, float), "val_return_post": (int, float),
}
KINDS = ("regression", "classification", "rl")
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def check_state(state: dict[str, Any], path: str | Path) -> None:
    """Refuse a state whose known fields have the wrong JSON type (``model_spec`` an array, ``config`` a
    list, ``step`` a string or negative, ``kind`` unknown), naming the field: the code that reads them
    expects these shapes and would fail in its own words (an ``AttributeError``) or not at all."""
    for name, types_ in STATE_FIELDS.items():
        if name not in state:
            continue
        value = state[name]
        if not isinstance(value, types_) or (isinstance(value, bool) and bool not in types_):
            wanted = " or ".join(dict.fromkeys(_JSON_NAMES[t] for t in types_))
            raise CheckpointError(f"{path}: its state's {name!r} is {_JSON_NAMES.get(type(value), 'a value')}, not "
                                  f"{wanted}; the file is damaged or was not written by mamlkit")
    problems = []
    if isinstance(state.get("step"), int) and state["step"] < 0:
        problems.append(f"'step' is {state['step']}, not a count of iterations")
    if isinstance(state.get("num_classes"), int) and state["num_classes"] < 1:
        problems.append(f"'num_classes' is {state['num_classes']}, not a number of classes")
    if "kind" in state and state["kind"] not in KINDS:
        problems.append(f"'kind' is {state['kind'][:100]!r}, not one of {', '.join(KINDS)}")
    if not all(isinstance(c, str) for c in state.get("class_names") or ()):
        problems.append("'class_names' holds values that are not strings")
    if problems:
        raise CheckpointError(f"{path}: its state's {problems[0]}; the file is damaged or was not written by mamlkit")


def check_digests(tensors: dict[str, Tensor], meta: dict[str, str], path: str | Path) -> None:
    """Check every tensor against the dtype, shape and sha256 recorded when the file was written (:data:`DIGESTS`):
    a bit flipped on a disk or in a transfer, a tensor edited, added or removed since, named. Files written
    before digests were recorded have no record and load without this check."""
    if DIGESTS not in meta:
        return
    record = parse_record(meta[DIGESTS], DIGESTS, path)
    if not isinstance(record, dict) or not all(isinstance(v, list) and len(v) == 3 and isinstance(v[2], str)
                                               for v in record.values()):
        raise CheckpointError(f"{path}: its {DIGESTS!r} record is not a table of tensor digests; the file is damaged")
    problems = [f"{name} is missing (the file was written with it)" for name in sorted(record.keys() - tensors.keys())]
    problems += [f"{name} is not a tensor the file was written with" for name in sorted(tensors.keys() - record.keys())]
    for name in sorted(tensors.keys() & record.keys()):
        written, now = record[name][:2], _describe(tensors[name])
        if written != now:
            problems.append(f"{name} is {now[0]} {now[1]}, written as {written[0]} {written[1]}")
        elif tensor_digest(tensors[name]) != record[name][2]:
            problems.append(f"{name}'s values do not match the sha256 recorded when it was written")
    if problems:
        raise CheckpointError(f"{path} is damaged: {'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. "
                              "Its tensors changed since the file was written (a disk or transfer error, or an "
                              "edit): use another copy or an earlier checkpoint.")


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every floating (or complex) tensor of ``tensors`` is free of NaN and inf: one fused check, one
    synchronisation, whatever the number of tensors."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() or t.is_complex()]
    return not checks or bool(torch.stack(checks).all())


def check_finite(tensors: dict[str, Tensor], path: str | Path) -> None:
    """Refuse NaN or infinite values in any stored tensor (weights, buffers, optimiser moments), naming the
    tensors: a model with them predicts NaN, silently."""
    counts = {name: int((~torch.isfinite(t)).sum()) for name, t in sorted(tensors.items())
              if t.is_floating_point() or t.is_complex()}
    bad = {name: n for name, n in counts.items() if n}
    if bad:
        named = ", ".join(f"{name} ({n:,} of {tensors[name].numel():,} values)" for name, n in list(bad.items())[:5])
        raise CheckpointError(f"{path}: NaN or infinite values in tensor{'s' * (len(bad) > 1)} {named}"
                              f"{' ...' if len(bad) > 5 else ''}. A model with them predicts NaN: the run had "
                              "diverged when this was written, or the file is damaged; use an earlier checkpoint.")


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot hold tensors on this machine (not a device name, no such CUDA device), or None:
    torch would fail on first use in its own words (an ``AssertionError`` for CUDA in a CPU-only build)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return "that is not a torch device (cpu, cuda, cuda:1, mps)"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "this machine has no CUDA device"
        if dev.index is not None and dev.index >= count:
            return f"this machine has {count} CUDA device{'s' * (count > 1)} (cuda:0 to cuda:{count - 1})"
        return None
    if dev.type == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no MPS device"
    return f"mamlkit runs on cpu, cuda or mps devices, not {dev.type}"


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
    meta["config"] = {**meta["config"], "out_dir": "runs", "run_name": ""}
    if "data_root" in meta["config"]:  # only the config of a family that reads a data folder has one
        meta["config"]["data_root"] = ""
    save(dest, keep, meta)
