"""Meta-SGD (Li, Zhou, Chen & Li, 2017, arXiv:1707.09835): MAML with a learned inner rate per
parameter entry, α ∈ R^{|θ|}, meta-learned together with θ.

Pieces: every parameter adapts (or those passing ``adapt_filter``); the inner rule is
:func:`~mamlkit.engine.rules.per_parameter_sgd` over the rate tensors, which are meta-parameters named
``inner_lr/<param>``; the outer objective is MAML's query loss, second order unless
``first_order``. The paper draws α's initial values at random; here every rate starts at
``inner_lr`` (deterministic, and exactly MAML at initialisation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mamlkit.algorithms import register, resolve_loss
from mamlkit.base.batch import TaskBatch
from mamlkit.engine.functional import named_buffers, named_params
from mamlkit.engine.inner import (
    adapt_path,
    make_task_fn,
    name_filter,
    path_objective,
    query_objective,
    split_params,
    support_loss_fn,
)
from mamlkit.engine.norms import with_bn_mode
from mamlkit.engine.rules import per_parameter_sgd
from mamlkit.exec import strategies

PREFIX = "inner_lr/"


class MetaSGD:
    """Meta-SGD over any ``nn.Module``; see the module docstring. Arguments as :class:`MAML`."""

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse",
                 kind: str | None = None, adapt_filter: Callable[[str], bool] | None = None,
                 test_inner_steps: int | None = None, strategy: str = "auto", chunk_size: int | None = None,
                 name: str = "metasgd", bn_mode: str = "transductive"):
        self.loss_fn, self.kind = resolve_loss(loss_fn, kind)
        self.model, self.name = model, name
        self.inner_steps, self.first_order, self.adapt_filter = inner_steps, first_order, adapt_filter
        self.bn_mode = bn_mode  # "support": query predictions use support-set BN statistics (mamlkit.engine.norms)
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        # One rate tensor per adapted parameter, same shape (the paper's vector α).
        self.inner_lrs = {k: nn.Parameter(torch.full_like(p.detach(), inner_lr))
                          for k, p in named_params(model, adapt_filter).items()}
        device = next(model.parameters()).device
        self.strategy = strategies.choose_strategy(strategy, model, device, chunk_size)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return {**dict(self.model.named_parameters()), **{PREFIX + k: v for k, v in self.inner_lrs.items()}}

    def buffers(self) -> dict[str, Tensor]:
        return named_buffers(self.model)

    def _task_fn(self, params, lrs, steps: int, first_order: bool, objective=query_objective):
        return make_task_fn(self.model, params, self.buffers(), loss_fn=self.loss_fn,
                            rule=per_parameter_sgd(lrs), steps=steps, first_order=first_order,
                            adapt_filter=self.adapt_filter,
                            objective=with_bn_mode(objective, self.bn_mode))

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        fn = self._task_fn(named_params(self.model), self.inner_lrs, self.inner_steps, self.first_order)
        losses, preds = strategies.map_tasks(fn, batch, self.strategy)
        return losses.mean(), strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        fn = self._task_fn(named_params(self.model), self.inner_lrs, self.inner_steps, self.first_order)
        losses, preds = strategies.backward_tasks(fn, batch, self.strategy, weight,
                                              self.meta_parameters().values())
        return strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt to one task with the learned rates; returns every parameter, detached."""
        steps = self.test_inner_steps if steps is None else steps
        params = {k: v.detach() for k, v in named_params(self.model).items()}
        fast, shared = split_params(params, self.adapt_filter)
        loss = support_loss_fn(self.model, self.loss_fn, shared, self.buffers())
        lrs = {k: v.detach() for k, v in self.inner_lrs.items()}
        path = adapt_path(loss, fast, support_x, support_y, rule=per_parameter_sgd(lrs), steps=steps,
                          first_order=True)
        return {**shared, **{k: v.detach() for k, v in path[-1].items()}}

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        params = {k: v.detach() for k, v in named_params(self.model).items()}
        lrs = {k: v.detach() for k, v in self.inner_lrs.items()}
        fn = self._task_fn(params, lrs, steps, first_order=True, objective=path_objective(self.kind))
        losses, accs = strategies.map_tasks(fn, batch, self.strategy)
        return losses.detach(), accs.detach()


@register("metasgd")
def build(model: nn.Module, cfg) -> MetaSGD:
    """Meta-SGD (Li et al. 2017): learned per-parameter inner rates, initialised at --inner-lr."""
    return MetaSGD(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=cfg.first_order,
                   loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps, strategy=cfg.strategy,
                   chunk_size=cfg.chunk_size or None, bn_mode=cfg.bn_mode, adapt_filter=name_filter(cfg.adapt))
