"""How much memory a meta-iteration needs: measured on a probe, before training launches.

Second-order MAML keeps the graph of every inner step until the meta-gradient is taken, so its
memory grows with the inner steps and, under vmap, with the tasks run together. Rather than
model that arithmetic per layer type, :func:`peak_tensor_bytes` runs the real computation on a
few tasks under a ``TorchDispatchMode`` that sees every tensor the kernels allocate, and records
the peak of the bytes alive at once. It counts tensor storage only (not the allocator's slack or
the Python process), on any device, and works under ``torch.func`` transforms, where saved-tensor
hooks (and so ``torch.distributed._tools.mem_tracker``) do not.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class ProbeStopped(Exception):
    """A probe passed its byte limit: what it measured needs more than ``nbytes``."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(f"over {nbytes} bytes of tensors")
        self.nbytes = nbytes


class _PeakTracker(TorchDispatchMode):
    """Live bytes of the storages created inside the mode; a storage counts until it is freed. With a
    ``limit``, raises :class:`ProbeStopped` as soon as the live bytes pass it."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        self.live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        self.limit = limit

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage not in self.live:
                    nbytes = storage.nbytes()
                    self.live[storage] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, nbytes)
        if self.limit is not None and self.current > self.limit:
            raise ProbeStopped(self.current)
        return out


def peak_tensor_bytes(fn: Callable[[], Any], limit: int | None = None) -> int:
    """Run ``fn()`` and return the peak bytes of tensor storage it held alive at once.

    Tensors that existed before the call (parameters, the data) are not counted. With ``limit``, ``fn``
    is stopped (:class:`ProbeStopped`) once it holds more, so that a probe of a strategy already known to
    be too big does not itself raise the process's peak memory.
    """
    tracker = _PeakTracker(limit)
    with tracker:
        fn()
    return tracker.peak


def gradient_peak(run: Callable[[], Any], params: Iterable[torch.Tensor], limit: int | None = None) -> int:
    """Peak tensor bytes of ``run()``, a backward pass that accumulates into the ``.grad`` of ``params``; the
    gradients it accumulates are removed again and the global RNG is left as it was (dropout draws must not
    shift the run's). ``limit``: as in :func:`peak_tensor_bytes`."""
    params = list(params)
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with torch.random.fork_rng(devices=[]):
            return peak_tensor_bytes(run, limit)
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MB" if nbytes < 10 * 2**20 else f"{nbytes / 2**20:,.0f} MB"
