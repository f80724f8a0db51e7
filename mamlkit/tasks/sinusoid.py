"""Sinusoid regression (Finn et al. 2017, §5.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mamlkit.base.batch import TaskBatch


@dataclass(frozen=True, kw_only=True)
class Sinusoid:
    """y = A sin(x − φ), A ~ U[0.1, 5.0], φ ~ U[0, π], x ~ U[−5, 5] (the paper's ranges).

    ``sample`` draws every task and point in one vectorised call.
    """

    k_support: int = 10
    k_query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    kind: str = "regression"

    def __post_init__(self) -> None:
        if self.k_support < 1 or self.k_query < 1:
            raise ValueError(f"Sinusoid needs k_support >= 1 and k_query >= 1, got {self.k_support}, {self.k_query}")

    def sample_params(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Amplitudes and phases ``[T]`` of ``num_tasks`` tasks."""
        u = torch.rand(2, num_tasks, generator=generator, dtype=torch.float64)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        return amp, phase

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` tasks: x ``[T, K, 1]``, y ``[T, K, 1]`` for support and query (float32)."""
        amp, phase = self.sample_params(num_tasks, generator)
        n = self.k_support + self.k_query
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(num_tasks, n, 1, generator=generator, dtype=torch.float64)
        y = amp[:, None, None] * torch.sin(x - phase[:, None, None])
        x, y = x.float(), y.float()
        k = self.k_support
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    @staticmethod
    def curve(amp: Tensor, phase: Tensor, x: Tensor) -> Tensor:
        """The true function of tasks ``(amp [T], phase [T])`` at ``x [P]``: ``[T, P]``."""
        return amp[:, None] * torch.sin(x[None, :] - phase[:, None])
