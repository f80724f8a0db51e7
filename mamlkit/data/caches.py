"""Preprocessed caches: one tensor in a safetensors file, with string metadata that says what it was built
from, written atomically and carrying the sha256 of its own values. A cache that is missing, unreadable,
stale (its metadata does not match what the caller would build) or corrupt (its values no longer hash to
the recorded sha256) reads as ``None``, and the caller rebuilds it. Shared by the Omniglot, mini-ImageNet,
image-folder and CLINC150 caches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

# one digest for caches and checkpoints; it lives in the Store part, which Data may import (and not the reverse)
from mamlkit.checkpoint import atomic_write, tensor_digest


def read_cache(path: Path, name: str, *, digest_key: str,
               valid: Callable[[dict[str, str], Tensor], bool] = lambda meta, values: True
               ) -> tuple[dict[str, str], Tensor] | None:
    """``(metadata, tensor name)`` of the cache file ``path``, or ``None`` when it is missing or unreadable,
    when ``valid(metadata, tensor)`` is false or raises (stale: built from other inputs, another shape),
    or when the tensor's :func:`tensor_digest` is not the one recorded under ``digest_key`` (corrupt).
    ``valid`` runs first, so a stale cache is not hashed."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            values = f.get_tensor(name)
        ok = valid(meta, values) and tensor_digest(values) == meta.get(digest_key)
    except Exception:  # noqa: BLE001 - any unreadable cache is simply rebuilt
        return None
    return (meta, values) if ok else None


def write_cache(path: Path, name: str, values: Tensor, meta: dict[str, str], *, digest_key: str) -> None:
    """Write ``values`` as the tensor ``name`` of the safetensors file ``path``, atomically, with ``meta``
    and the values' :func:`tensor_digest` under ``digest_key``. Raises ``OSError`` where the file cannot be
    written (a read-only disk): what that costs is the caller's to say."""
    from safetensors.torch import save_file

    meta = {**meta, digest_key: tensor_digest(values)}
    atomic_write(path, lambda tmp: save_file({name: values}, tmp, metadata=meta))
