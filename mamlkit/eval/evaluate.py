"""Evaluation: adapt on fixed test tasks, report mean ± 95% CI after each number of inner steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad

from mamlkit.algorithms import MetaLearner
from mamlkit.base.batch import TaskBatch, TaskDistribution, task_generator
from mamlkit.base.metrics import mean_ci
from mamlkit.base.stops import stop_point
from mamlkit.engine.functional import named_params
from mamlkit.engine.inner import support_loss_fn

# A test-time step that would raise a task's support loss by more than this fraction is halved.
DESCENT_TOLERANCE = 1e-3
# A task whose query loss after adapting is over this many times its loss before adapting has diverged.
DIVERGED_GROWTH = 10
# At most this many halvings (down to α/1024); a step that still fails leaves the task where it was.
MAX_HALVINGS = 10


@dataclass(frozen=True)
class EvalResult:
    """Per-task query loss and accuracy ``[num_tasks, max_steps+1]`` after 0..max_steps inner steps.

    ``halved [num_tasks]`` (descent-safeguarded evaluation only): tasks on which some step was halved
    because the full step would have raised the support loss."""

    losses: torch.Tensor
    accs: torch.Tensor
    halved: torch.Tensor | None = None

    def loss(self, steps: int) -> tuple[float, float]:
        return mean_ci(self.losses[:, steps])

    def acc(self, steps: int) -> tuple[float, float]:
        return mean_ci(self.accs[:, steps])

    def diverged(self, steps: int) -> int:
        """Tasks whose query loss after ``steps`` inner steps is not finite (inner SGD blew up)."""
        return int((~torch.isfinite(self.losses[:, steps])).sum())

    def cell(self, steps: int) -> dict:
        """The loss after ``steps`` steps as a strict-JSON record: ``mean``, ``ci95``, ``median`` (None
        where not finite) and ``flag``: None, or why the mean is not to be trusted. Checked on every
        cell: tasks whose loss is not finite, tasks whose loss grew over DIVERGED_GROWTH times its value
        before adaptation, a CI that is not finite, or a 95% CI wider than the mean (a few tasks far
        from the rest)."""
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
        stop_point()
        chunk = tasks[start:start + batch_size].to(device, dtype)
        l, a = learner.adapted_losses(chunk, max_steps)
        losses.append(l.cpu())
        accs.append(a.cpu())
    return EvalResult(torch.cat(losses), torch.cat(accs))


def safeguarded(learner: MetaLearner) -> bool:
    """Whether :func:`descent_path` applies: plain SGD at one rate on every parameter from θ itself (MAML,
    FOMAML and the pretrained baseline). Other rules (learned rates, head-only, proximal) keep their own path."""
    p = getattr(learner, "pieces", None)
    return (p is not None and p.adapts is None and p.rule is None and not p.extras and p.start is None
            and p.inner_loss is None and p.task is None and p.adapt is None
            and all(t.requires_grad for t in learner.model.parameters()))


def descent_path(learner: MetaLearner, support_x: Tensor, support_y: Tensor, steps: int
                 ) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Test-time inner SGD at ``learner.inner_lr`` on every task at once, with a descent safeguard.

    ``support_x [T, K, ...]``, ``support_y [T, K, ...]``. Each step is the learner's plain step
    θ ← θ − α∇L_support(θ) whenever that step does not raise the task's support loss (by more than
    DESCENT_TOLERANCE); otherwise that task's step is halved until it does not (at most MAX_HALVINGS
    times, else the task keeps its parameters for that step). So a task's support loss never grows,
    and the query loss cannot run away whatever the float trajectory of training was; on tasks where
    plain SGD descends, the result is plain SGD (Finn et al. 2017, Eq. 1).

    Returns the parameters after 0..steps steps (each ``[T, *shape]``) and ``halved [T]``: tasks on
    which some step was halved. Every parameter adapts (the learner's ``adapt_filter`` must be None).

    The tasks run on the learner's executor (:meth:`~mamlkit.exec.executor.Executor.map`): vectorised
    where its strategy is, one by one otherwise or where vmap cannot run the model (a recurrent layer, a
    tensor's value read in Python, dropout), so any model that trains is evaluated.
    """
    if not safeguarded(learner):
        raise ValueError("descent_path runs plain SGD on every parameter; this learner adapts otherwise")
    loss = support_loss_fn(learner.model, learner.loss_fn, {}, learner.buffers(), learner.output)
    run, gradient = learner.executor.map, grad(loss)

    def losses(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return run(loss, params, x, y)

    def grads(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return run(gradient, params, x, y)

    num_tasks = support_x.shape[0]
    params = {k: v.detach().expand(num_tasks, *v.shape).clone() for k, v in named_params(learner.model).items()}
    path, halved = [params], torch.zeros(num_tasks, dtype=torch.bool, device=support_x.device)

    def per_task(v: Tensor, like: Tensor) -> Tensor:
        return v.view(-1, *[1] * (like.dim() - 1))

    with torch.no_grad():
        for _ in range(steps):
            stop_point()  # a stop signal may end an evaluation between steps (mamlkit.base.stops)
            current = losses(params, support_x, support_y)
            g = grads(params, support_x, support_y)
            rate = torch.full_like(current, learner.pieces.inner_lr)
            new, done = params, torch.zeros_like(halved)
            for attempt in range(MAX_HALVINGS + 1):
                trial = {k: p - per_task(rate, p) * g[k] for k, p in params.items()}
                after = losses(trial, support_x, support_y)
                ok = ~done & torch.isfinite(after) & (after <= current + DESCENT_TOLERANCE * current.abs())
                new = {k: torch.where(per_task(ok, v), trial[k], v) for k, v in new.items()}
                if attempt == 0:
                    halved |= ~ok
                done |= ok
                if bool(done.all()):
                    break
                rate = rate / 2
            params = new
            path.append(params)
    return path, halved


def evaluate_descent(learner: MetaLearner, tasks: TaskBatch, max_steps: int, batch_size: int = 100,
                     device: str = "cpu", dtype: torch.dtype = torch.float32) -> EvalResult:
    """Query loss ``[T, max_steps+1]`` after 0..max_steps safeguarded steps (:func:`descent_path`) on
    every task of ``tasks``, ``batch_size`` tasks at a time (regression: accuracies are zeros). A learner
    with another inner rule (:func:`safeguarded` False) is evaluated on its own path (:func:`evaluate`)."""
    if not safeguarded(learner):
        return evaluate(learner, tasks, max_steps, batch_size, device, dtype)
    losses, halved = [], []
    query = support_loss_fn(learner.model, learner.loss_fn, {}, learner.buffers(), learner.output)
    for start in range(0, tasks.num_tasks, batch_size):
        stop_point()
        chunk = tasks[start:start + batch_size].to(device, dtype)
        path, h = descent_path(learner, chunk.support_x, chunk.support_y, max_steps)
        with torch.no_grad():
            losses.append(torch.stack([learner.executor.map(query, p, chunk.query_x, chunk.query_y) for p in path],
                                      1).cpu())
        halved.append(h.cpu())
    out = torch.cat(losses)
    return EvalResult(out, torch.zeros_like(out), torch.cat(halved))


def fmt(mean: float, ci: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"
