"""Evaluation: adapt on fixed test tasks, report mean ± 95% CI after each number of inner steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mamlkit.algorithms import MetaLearner
from mamlkit.base.batch import TaskBatch, TaskDistribution, task_generator
from mamlkit.base.metrics import mean_ci
from mamlkit.base.stops import stop_point

# A task whose query loss after adapting is over this many times its loss before adapting has diverged.
DIVERGED_GROWTH = 10
# A mean over this many times the median is set by a few tasks far from the rest (a rare blow-up).
MEAN_OVER_MEDIAN = 5


@dataclass(frozen=True)
class EvalResult:
    """Per-task query loss and accuracy ``[num_tasks, max_steps+1]`` after 0..max_steps inner steps.

    ``halved [num_tasks]`` (guarded evaluation only, ``evaluate(..., guard=True)``): tasks on which some step
    was halved because the full step would have raised the support loss."""

    losses: torch.Tensor
    accs: torch.Tensor
    halved: torch.Tensor | None = None

    def loss(self, steps: int) -> tuple[float, float]:
        return mean_ci(self.losses[:, steps])

    def acc(self, steps: int) -> tuple[float, float]:
        return mean_ci(self.accs[:, steps])

    def acc_cell(self, steps: int) -> dict:
        """The accuracy after ``steps`` steps as a strict-JSON record (fractions): ``mean``, ``ci95``, ``median``
        and ``flag``: None, or the tasks whose loss is not finite (their accuracy hides the blow-up)."""
        mean, ci = self.acc(steps)
        bad = self.diverged(steps)
        return {"mean": mean, "ci95": ci if math.isfinite(ci) else None,
                "median": self.accs[:, steps].double().median().item(),
                "flag": f"loss not finite on {bad}/{len(self.losses)} tasks" if bad else None}

    def acc_text(self, steps: int) -> str:
        """``mean ± ci (median m)`` in percent, followed by the cell's flag when there is one."""
        c = self.acc_cell(steps)
        ci = "—" if c["ci95"] is None else f"{100 * c['ci95']:.2f}"
        text = f"{100 * c['mean']:.2f} ± {ci} (median {100 * c['median']:.2f})"
        return text + (f" ⚠ {c['flag']}" if c["flag"] else "")

    def diverged(self, steps: int) -> int:
        """Tasks whose query loss after ``steps`` inner steps is not finite (inner SGD blew up)."""
        return int((~torch.isfinite(self.losses[:, steps])).sum())

    def cell(self, steps: int) -> dict:
        """The loss after ``steps`` steps as a strict-JSON record: ``mean``, ``ci95``, ``median`` (None
        where not finite) and ``flag``: None, or why the mean is not to be trusted. Checked on every
        cell: tasks whose loss is not finite, tasks whose loss grew over DIVERGED_GROWTH times its value
        before adaptation, a CI that is not finite, a 95% CI wider than the mean, or a mean over
        MEAN_OVER_MEDIAN times the median (both: a few tasks far from the rest)."""
        values = self.losses[:, steps].double()
        n, bad = len(values), self.diverged(steps)
        mean, ci = mean_ci(values)
        median = values.median().item()
        grown = int((values > DIVERGED_GROWTH * self.losses[:, 0].double()).sum()) if steps else 0
        flag = None
        if bad:
            flag = f"not finite on {bad}/{n} tasks"
        elif grown:
            flag = f"loss over {DIVERGED_GROWTH}× its pre-update value on {grown}/{n} tasks"
        elif n < 2:
            flag = "no confidence interval (fewer than 2 tasks)"
        elif not math.isfinite(ci):
            flag = "confidence interval not finite (the loss overflows)"
        elif ci > abs(mean):
            flag = "95% CI wider than the mean: outlier tasks"
        elif median > 0 and mean > MEAN_OVER_MEDIAN * median:
            flag = f"mean over {MEAN_OVER_MEDIAN}× the median: outlier tasks"

        def finite(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {"mean": finite(mean), "ci95": finite(ci), "median": finite(median), "flag": flag}

    def loss_text(self, steps: int, digits: int = 3) -> str:
        """``mean ± ci (median m)``, followed by the cell's flag when there is one."""
        c = self.cell(steps)

        def num(v: float | None) -> str:
            return "—" if v is None else f"{v:.{digits}f}"

        text = f"{num(c['mean'])} ± {num(c['ci95'])} (median {num(c['median'])})"
        return text + (f" ⚠ {c['flag']}" if c["flag"] else "")


# How to read a cell of :meth:`EvalResult.loss_text`, for a report's header.
CELL_LEGEND = (f"Each cell: mean ± 95% CI over the tasks, then the median; ⚠ flags a cell whose mean is not to be "
               f"trusted: a task's loss not finite, a loss over {DIVERGED_GROWTH}× its pre-update value, a CI wider "
               f"than the mean or a mean over {MEAN_OVER_MEDIAN}× the median (a few tasks far from the rest).")


ACC_LEGEND = ("Each cell: mean ± 95% CI over the tasks, then the median; ⚠ flags a cell where some task's loss "
              "is not finite (its accuracy would hide the blow-up).")


def test_tasks(dist: TaskDistribution, seed: int, num_tasks: int, split: str = "test") -> TaskBatch:
    """``num_tasks`` fixed tasks; task k is drawn from ``(seed, split, k)`` alone, so the set is the
    same whatever the batch size or the number of tasks asked for."""
    return TaskBatch.cat([dist.sample(1, task_generator(seed, split, k)) for k in range(num_tasks)])


def evaluate(learner: MetaLearner, tasks: TaskBatch, max_steps: int, batch_size: int = 100,
             device: str = "cpu", dtype: torch.dtype = torch.float32, guard: bool = False) -> EvalResult:
    """Adapt ``learner`` on every task of ``tasks`` with 0..max_steps inner steps (the same inner loop and
    rule as training: the paper's protocol) and collect the query metrics, ``batch_size`` tasks at a time.

    ``guard``: the learner's rule within the descent safeguard (:func:`mamlkit.engine.rules.descent_guard`:
    a step that would raise a task's support loss is halved), the guarded table; ``halved`` then says on
    which tasks some step was."""
    losses, accs, halved = [], [], []
    for start in range(0, tasks.num_tasks, batch_size):
        stop_point()
        chunk = tasks[start:start + batch_size].to(device, dtype)
        if guard:
            l, a, h = learner.guarded_losses(chunk, max_steps)
            halved.append(h.any(1).cpu())
        else:
            l, a = learner.adapted_losses(chunk, max_steps)
        losses.append(l.cpu())
        accs.append(a.cpu())
    return EvalResult(torch.cat(losses), torch.cat(accs), torch.cat(halved) if guard else None)


def fmt(mean: float, ci: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"
