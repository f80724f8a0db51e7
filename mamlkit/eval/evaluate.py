"""Evaluation: adapt on fixed test tasks, report mean ± 95% CI after each number of inner steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamlkit.algorithms import MetaLearner
from mamlkit.base.batch import TaskBatch, TaskDistribution, task_generator
from mamlkit.base.metrics import mean_ci


@dataclass(frozen=True)
class EvalResult:
    """Per-task query loss and accuracy ``[num_tasks, max_steps+1]`` after 0..max_steps inner steps."""

    losses: torch.Tensor
    accs: torch.Tensor

    def loss(self, steps: int) -> tuple[float, float]:
        return mean_ci(self.losses[:, steps])

    def acc(self, steps: int) -> tuple[float, float]:
        return mean_ci(self.accs[:, steps])

    def diverged(self, steps: int) -> int:
        """Tasks whose query loss after ``steps`` inner steps is not finite (inner SGD blew up)."""
        return int((~torch.isfinite(self.losses[:, steps])).sum())

    def loss_text(self, steps: int, digits: int = 3) -> str:
        """``mean ± ci``, or, when some tasks diverged, that count and the finite tasks' mean ± ci."""
        bad = self.diverged(steps)
        if not bad:
            return fmt(*self.loss(steps), digits)
        finite = self.losses[:, steps][torch.isfinite(self.losses[:, steps])]
        return f"diverged on {bad}/{len(self.losses)} (others {fmt(*mean_ci(finite), digits)})"


def test_tasks(dist: TaskDistribution, seed: int, num_tasks: int, split: str = "test") -> TaskBatch:
    """``num_tasks`` fixed tasks; task k is drawn from ``(seed, split, k)`` alone, so the set is the
    same whatever the batch size or the number of tasks asked for."""
    return TaskBatch.cat([dist.sample(1, task_generator(seed, split, k)) for k in range(num_tasks)])


def evaluate(learner: MetaLearner, tasks: TaskBatch, max_steps: int, batch_size: int = 100,
             device: str = "cpu", dtype: torch.dtype = torch.float32) -> EvalResult:
    """Adapt ``learner`` on every task of ``tasks`` with 0..max_steps inner steps (the same ``adapt``
    path as training) and collect the query metrics, ``batch_size`` tasks at a time."""
    losses, accs = [], []
    for start in range(0, tasks.num_tasks, batch_size):
        chunk = tasks[start:start + batch_size].to(device, dtype)
        l, a = learner.adapted_losses(chunk, max_steps)
        losses.append(l.cpu())
        accs.append(a.cpu())
    return EvalResult(torch.cat(losses), torch.cat(accs))


def fmt(mean: float, ci: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"
