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

from mamlkit.algorithms import register, resolve_loss
from mamlkit.base.batch import TaskBatch
from mamlkit.engine.functional import call, named_buffers, named_params
from mamlkit.engine.inner import (
    Params,
    adapt_final,
    adapt_path,
    fresh,
    path_objective,
    query_objective,
    support_loss_fn,
)
from mamlkit.engine.norms import with_bn_mode
from mamlkit.engine.rules import InnerRule, adam, sgd
from mamlkit.exec import strategies


class Reptile:
    """Reptile over any ``nn.Module``.

    Args:
        inner_lr, inner_steps: the inner optimiser's rate and steps during meta-training.
        inner_optimizer: ``"sgd"`` or ``"adam"`` (β1 = 0, the paper's choice).
        test_inner_steps: steps at evaluation and in :meth:`adapt` (default: ``inner_steps``).
    Other arguments as :class:`~mamlkit.algorithms.maml.MAML`.
    """

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.02, inner_steps: int = 5,
                 inner_optimizer: str = "sgd", loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse",
                 kind: str | None = None, test_inner_steps: int | None = None, strategy: str = "auto",
                 chunk_size: int | None = None, name: str = "reptile", bn_mode: str = "transductive"):
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"Reptile's inner optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        self.loss_fn, self.kind = resolve_loss(loss_fn, kind)
        self.model, self.name = model, name
        self.inner_steps, self.inner_optimizer, self.inner_lr = inner_steps, inner_optimizer, inner_lr
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.bn_mode = bn_mode  # "support": query predictions use support-set BN statistics (mamlkit.engine.norms)
        device = next(model.parameters()).device
        self.strategy = strategies.choose_strategy(strategy, model, device, chunk_size)

    @property
    def rule(self) -> InnerRule:
        return adam(self.inner_lr) if self.inner_optimizer == "adam" else sgd(self.inner_lr)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def buffers(self) -> dict[str, Tensor]:
        return named_buffers(self.model)

    def _predict(self, fast: Params, x: Tensor) -> Tensor:
        return call(self.model, fast, fresh(self.buffers()), x)

    def _task_fn(self, theta: Params):
        loss = support_loss_fn(self.model, self.loss_fn, {}, self.buffers())
        rule, steps = self.rule, self.inner_steps
        query = with_bn_mode(query_objective, self.bn_mode)

        def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            phi = adapt_final(loss, theta, sx, sy, rule=rule, steps=steps)
            q_loss, pred = query([phi], loss, sx, sy, qx, qy, predict=self._predict, loss_fn=self.loss_fn)
            surrogate = sum((theta[k] * (theta[k] - phi[k]).detach()).sum() for k in theta)
            # Value: the query loss at φ (logged); gradient w.r.t. θ: θ − φ.
            return q_loss.detach() + surrogate - surrogate.detach(), pred.detach()

        return task_fn

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean query loss at φ; its ``.backward()`` writes mean_t (θ − φ_t) into ``.grad``."""
        losses, preds = strategies.map_tasks(self._task_fn(named_params(self.model)), batch, self.strategy)
        return losses.mean(), strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        """Accumulate ``weight × mean_t (θ − φ_t)`` into ``.grad``."""
        fn = self._task_fn(named_params(self.model))
        losses, preds = strategies.backward_tasks(fn, batch, self.strategy, weight,
                                              self.meta_parameters().values())
        return strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """φ for one task with Reptile's inner optimiser; every parameter, detached."""
        steps = self.test_inner_steps if steps is None else steps
        loss = support_loss_fn(self.model, self.loss_fn, {}, self.buffers())
        return adapt_final(loss, named_params(self.model), support_x, support_y, rule=self.rule, steps=steps)

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        params = {k: v.detach() for k, v in named_params(self.model).items()}
        loss = support_loss_fn(self.model, self.loss_fn, {}, self.buffers())
        objective, rule = with_bn_mode(path_objective(self.kind), self.bn_mode), self.rule

        def fn(sx, sy, qx, qy):
            path = adapt_path(loss, params, sx, sy, rule=rule, steps=steps, first_order=True)
            return objective(path, loss, sx, sy, qx, qy, predict=self._predict, loss_fn=self.loss_fn)

        losses, accs = strategies.map_tasks(fn, batch, self.strategy)
        return losses.detach(), accs.detach()


@register("reptile", uses=frozenset({"reptile_inner_optimizer", "reptile_inner_lr", "reptile_inner_steps"}))
def build(model: nn.Module, cfg) -> Reptile:
    """Reptile (Nichol et al. 2018): outer gradient θ − mean(φ), own inner optimiser, no unrolling."""
    test_steps = cfg.test_inner_steps if cfg.test_inner_steps is not None else cfg.reptile_inner_steps
    return Reptile(model, inner_lr=cfg.reptile_inner_lr, inner_steps=cfg.reptile_inner_steps,
                   inner_optimizer=cfg.reptile_inner_optimizer, loss_fn=cfg.loss, test_inner_steps=test_steps,
                   strategy=cfg.strategy, chunk_size=cfg.chunk_size or None, bn_mode=cfg.bn_mode)
