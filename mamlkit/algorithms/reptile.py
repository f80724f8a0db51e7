"""Reptile (Nichol, Achiam & Schulman, 2018, arXiv:1803.02999).

Pieces: every parameter adapts; the inner rule is Reptile's own optimiser (SGD, or Adam with
β1 = 0 as in the paper's §6) at its own rate and step count (``reptile_inner_*``); the inner loop
is not differentiated (:func:`~mamlkit.engine.inner.adapt_final` keeps no graph and only the current
iterate, so memory does not grow with the number of steps); the outer "gradient" written into
``.grad`` is θ − mean_t φ_t, so an outer SGD step at rate ε is the paper's θ ← θ + ε(mean φ − θ).

The outer direction enters autograd through a surrogate per task, ⟨θ, stopgrad(θ − φ_t)⟩, whose
gradient is θ − φ_t; its value is replaced by the query loss at φ_t, which is what is logged.
So ``meta_loss``/``meta_backward`` and both execution strategies work unchanged. The inner loop
uses the support set with full-batch steps (the paper samples mini-batches of the task's data).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mamlkit.algorithms import register
from mamlkit.algorithms.driver import Driver, Pieces
from mamlkit.engine.functional import Params
from mamlkit.engine.inner import adapt_final, query_objective
from mamlkit.engine.norms import with_bn_mode
from mamlkit.engine.rules import InnerRule, adam, sgd
from mamlkit.exec.executor import Executor


def reptile_outer(learner: Driver, theta: Params, rule: InnerRule, *, steps: int, first_order: bool, objective):
    """Per task: φ after ``steps`` updates with no graph, and the surrogate whose gradient is θ − φ."""
    loss, query = learner.support_loss(), with_bn_mode(objective, learner.bn_mode)

    def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        phi = adapt_final(loss, theta, sx, sy, rule=rule, steps=steps)
        q_loss, pred = query([phi], loss, sx, sy, qx, qy, predict=learner.predict, loss_fn=learner.loss_fn)
        surrogate = sum((theta[k] * (theta[k] - phi[k]).detach()).sum() for k in theta)
        # Value: the query loss at φ (logged); gradient w.r.t. θ: θ − φ.
        return q_loss.detach() + surrogate - surrogate.detach(), pred.detach()

    return task_fn


def Reptile(model: nn.Module, *, inner_lr: float = 0.02, inner_steps: int = 5, inner_optimizer: str = "sgd",
            loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse", kind: str | None = None,
            test_inner_steps: int | None = None, name: str = "reptile", bn_mode: str = "transductive",
            executor: Executor | None = None, **execution) -> Driver:
    """Reptile over any ``nn.Module``.

    Args:
        inner_lr, inner_steps: the inner optimiser's rate and steps during meta-training.
        inner_optimizer: ``"sgd"`` or ``"adam"`` (β1 = 0, the paper's choice).
        test_inner_steps: steps at evaluation and in ``adapt`` (default: ``inner_steps``).
    Other arguments as :func:`~mamlkit.algorithms.maml.MAML`.
    """
    if inner_optimizer not in ("sgd", "adam"):
        raise ValueError(f"Reptile's inner optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
    pieces = Pieces(name=name, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                    rule=lambda extras: adam(inner_lr) if inner_optimizer == "adam" else sgd(inner_lr),
                    objective=lambda step: query_objective, outer=reptile_outer)
    return Driver(model, pieces, loss_fn=loss_fn, kind=kind, bn_mode=bn_mode, executor=executor, **execution)


@register("reptile")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """Reptile (Nichol et al. 2018): outer gradient θ − mean(φ), own inner optimiser, no unrolling."""
    test_steps = cfg.test_inner_steps if cfg.test_inner_steps is not None else cfg.reptile_inner_steps
    return Reptile(model, inner_lr=cfg.reptile_inner_lr, inner_steps=cfg.reptile_inner_steps,
                   inner_optimizer=cfg.reptile_inner_optimizer, loss_fn=cfg.loss, test_inner_steps=test_steps,
                   bn_mode=cfg.bn_mode, executor=executor, output=cfg.output_spec)
