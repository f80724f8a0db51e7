"""N-way, K-shot, Q-query episodes over a class-indexed tensor dataset, fully vectorised.

The dataset is one tensor ``data [C, M, *x_shape]``: ``C`` classes with ``M`` examples each
(Omniglot: ``[1200·4, 20, 28, 28]`` uint8). A batch of ``T`` tasks is drawn with three tensor
ops and one gather, whatever ``T``, ``N``, ``K`` and ``Q``:

1. classes: for each task, the first ``N`` entries of a uniform random permutation of the ``C``
   classes (``argsort`` of uniform noise), so the classes of a task are distinct and their order
   is uniformly random. Label ``j`` of a task is its ``j``-th class: the class-to-label map is a
   fresh uniform permutation for every task.
2. examples: for each (task, class), the first ``K + Q`` entries of a random permutation of the
   ``M`` examples; the first ``K`` are the support set, the next ``Q`` the query set, so support
   and query never share an example.
3. one advanced-indexing gather ``data[classes, examples]`` and a scale to float.

All randomness comes from the ``torch.Generator`` passed to :meth:`EpisodeSampler.sample`
(:func:`~mamlkit.base.batch.task_generator` makes it from (seed, split, index)). Support and
query examples are ordered by label: ``y = [0]*K + [1]*K + ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mamlkit.base.batch import TaskBatch


def sample_classes(num_classes: int, num_tasks: int, n_way: int, generator: torch.Generator) -> Tensor:
    """``[T, N]`` distinct class ids per task, in uniformly random order."""
    noise = torch.rand(num_tasks, num_classes, generator=generator)
    return noise.argsort(dim=-1)[:, :n_way]


def sample_examples(per_class: int, shape: tuple[int, ...], count: int, generator: torch.Generator) -> Tensor:
    """``[*shape, count]`` distinct example ids in ``[0, per_class)`` for every entry of ``shape``."""
    noise = torch.rand(*shape, per_class, generator=generator)
    return noise.argsort(dim=-1)[..., :count]


def gather(data: Tensor, classes: Tensor, examples: Tensor, k_shot: int, scale: float | None
           ) -> TaskBatch:
    """Build the :class:`TaskBatch` from ``classes [T, N]`` and ``examples [T, N, K+Q]``.

    ``x = data[classes, examples] * scale`` (float32; ``scale=None`` keeps the dtype);
    labels are the class positions ``0..N-1``.
    """
    T, N, n = examples.shape
    x = data[classes[..., None], examples]                      # [T, N, K+Q, *x_shape]
    if scale is not None:
        x = x.to(torch.float32).mul_(scale)
    y = torch.arange(N)[None, :, None].expand(T, N, n)
    sx, qx = x[:, :, :k_shot], x[:, :, k_shot:]
    sy, qy = y[:, :, :k_shot], y[:, :, k_shot:]
    def flat(t: Tensor) -> Tensor:  # [T, N, k, ...] -> [T, N*k, ...]
        return t.reshape(T, -1, *t.shape[3:])

    return TaskBatch(flat(sx), flat(sy), flat(qx), flat(qy))


@dataclass(frozen=True, eq=False)
class EpisodeSampler:
    """A :class:`~mamlkit.base.batch.TaskDistribution` of N-way K-shot episodes over ``data``.

    Args:
        data: ``[C, M, *x_shape]``, class-indexed (any dtype; uint8 images are typical).
        n_way, k_shot, k_query: N classes per task, K support and Q query examples per class.
        scale: inputs are ``data * scale`` as float32 (``1/255`` for uint8 images); ``None``
            returns the data's own dtype.

    ``sample(T, g)`` returns support ``x [T, N·K, *x_shape]``, ``y [T, N·K]`` (int64) and query
    ``[T, N·Q, ...]``.
    """

    data: Tensor
    n_way: int
    k_shot: int
    k_query: int
    scale: float | None = 1 / 255
    kind: str = "classification"

    def __post_init__(self) -> None:
        if self.data.dim() < 2:
            raise ValueError(f"EpisodeSampler needs data [classes, examples, ...], got "
                             f"{tuple(self.data.shape)}")
        C, M = self.data.shape[:2]
        if min(self.n_way, self.k_shot, self.k_query) < 1:
            raise ValueError(f"n_way, k_shot and k_query must be >= 1, got {self.n_way}, {self.k_shot}, "
                             f"{self.k_query}")
        if self.n_way > C:
            raise ValueError(f"{self.n_way}-way tasks need at least {self.n_way} classes; the split has {C}")
        if self.k_shot + self.k_query > M:
            raise ValueError(f"{self.k_shot} support + {self.k_query} query examples per class exceed the "
                             f"{M} examples each class has")

    @property
    def num_classes(self) -> int:
        return self.data.shape[0]

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(classes [T, N], examples [T, N, K+Q])``."""
        classes = sample_classes(self.num_classes, num_tasks, self.n_way, generator)
        examples = sample_examples(self.data.shape[1], (num_tasks, self.n_way), self.k_shot + self.k_query,
                                   generator)
        return classes, examples

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        classes, examples = self.sample_indices(num_tasks, generator)
        return gather(self.data, classes, examples, self.k_shot, self.scale)


__all__ = ["EpisodeSampler", "sample_classes", "sample_examples", "gather"]
