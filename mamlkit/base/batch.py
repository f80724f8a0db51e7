"""The task batch type, the task-distribution protocol, and deterministic task seeding."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskBatch:
    """A batch of T tasks, each a support set and a query set, stacked on a leading task dim.

    Shapes (checked once, here):
        support_x: ``[T, N_s, *x_shape]``
        support_y: ``[T, N_s, *y_shape]``
        query_x:   ``[T, N_q, *x_shape]``
        query_y:   ``[T, N_q, *y_shape]``
    Classification targets are integer class ids in ``[0, n_way)``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        sx, sy, qx, qy = self.support_x, self.support_y, self.query_x, self.query_y
        for name, t in (("support_x", sx), ("support_y", sy), ("query_x", qx), ("query_y", qy)):
            if not isinstance(t, Tensor):
                raise TypeError(f"TaskBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"TaskBatch.{name} needs shape [tasks, examples, ...], got {tuple(t.shape)}")
        T = sx.shape[0]
        if not (sy.shape[0] == qx.shape[0] == qy.shape[0] == T):
            raise ValueError(
                "TaskBatch: every field needs the same number of tasks on dim 0, got "
                f"{sx.shape[0]}, {sy.shape[0]}, {qx.shape[0]}, {qy.shape[0]}")
        if sy.shape[:2] != sx.shape[:2] or qy.shape[:2] != qx.shape[:2]:
            raise ValueError(
                f"TaskBatch: inputs and targets disagree on [tasks, examples]: support {tuple(sx.shape[:2])} "
                f"vs {tuple(sy.shape[:2])}, query {tuple(qx.shape[:2])} vs {tuple(qy.shape[:2])}")
        if sx.shape[2:] != qx.shape[2:]:
            raise ValueError(f"TaskBatch: support and query inputs differ in shape: {tuple(sx.shape[2:])} "
                             f"vs {tuple(qx.shape[2:])}")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, idx) -> TaskBatch:
        """Select tasks, keeping the task dim: ``batch[2:4]``, ``batch[[0, 3]]``."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return TaskBatch(self.support_x[idx], self.support_y[idx], self.query_x[idx], self.query_y[idx])

    def to(self, device=None, dtype=None) -> TaskBatch:
        """Move to ``device``; ``dtype`` applies to floating-point fields only."""
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return TaskBatch(mv(self.support_x), mv(self.support_y), mv(self.query_x), mv(self.query_y))

    @staticmethod
    def cat(batches: list[TaskBatch]) -> TaskBatch:
        return TaskBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                           ("support_x", "support_y", "query_x", "query_y")))


@runtime_checkable
class TaskDistribution(Protocol):
    """p(T): anything that samples a :class:`TaskBatch`."""

    kind: str  # "regression" or "classification"

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


def task_seed(*key: object) -> int:
    """A 63-bit seed that depends only on ``key``, e.g. ``(seed, "train", step)``.

    A hash (not arithmetic on the seed) keeps streams of different splits and steps independent.
    """
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def task_generator(seed: int, split: str, index: int, *extra: object) -> torch.Generator:
    """The generator for task batch ``index`` of ``split``: tasks depend only on (seed, split, index).

    This is what makes resumed runs exact without saving sampler state, and makes the
    evaluation tasks the same for every run that uses the same seed.
    """
    return torch.Generator().manual_seed(task_seed(seed, split, index, *extra))
