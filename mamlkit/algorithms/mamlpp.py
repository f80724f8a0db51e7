"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, arXiv:1810.09502, §4).

MAML with switchable fixes, each a piece of the engine:

* ``msl``: multi-step loss, Σ_k w_k L_q(θ_k) (:func:`~mamlkit.engine.inner.multi_step_objective`);
  the weights start uniform and anneal linearly over ``msl_epochs`` to the last step alone
  (non-final weights floored at 0.03/K while annealing), after which only L_q(θ_K) counts.
* ``lslr``: a learned rate per parameter tensor ("layer") and per step, meta-parameters
  ``inner_lr/<param>`` of shape ``[K]`` (:func:`~mamlkit.engine.rules.per_step_sgd`).
* ``per_step_bn``: each norm layer's weight and bias has one copy per step, meta-parameters
  ``bn/<param>`` ``[K+1, C]``; the forward pass at step k uses copy k, which the rule *sets* (the
  inner loop does not adapt them, as in the paper). Simplification: no per-step running
  *statistics*; mamlkit's norms use batch statistics during meta-learning, so there are none to
  keep, and models with ``track_running_stats=True`` use their single set.
* derivative-order annealing: first order while epoch < ``first_order_epochs``; the trainer
  reports the iteration through :meth:`MAMLPlusPlus.set_step` (epoch = step // epoch_iterations).
* cosine annealing of the meta rate is the trainer's ``meta_lr_schedule="cosine"``.

With every part off this is MAML exactly (a test checks loss and gradient in float64).
At evaluation, steps beyond K reuse the last step's rate and batch-norm copy.
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
    multi_step_objective,
    path_objective,
    query_objective,
    support_loss_fn,
)
from mamlkit.engine.norms import with_bn_mode
from mamlkit.engine.rules import InnerRule, per_step_sgd, sgd
from mamlkit.exec import strategies

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def msl_weights(steps: int, epoch: int, msl_epochs: int, dtype=torch.float32) -> Tensor:
    """Per-step loss weights ``[K]``: uniform at epoch 0, annealed to the last step by ``msl_epochs``."""
    w = torch.zeros(steps, dtype=dtype)
    if epoch >= msl_epochs or steps == 1:
        w[-1] = 1.0
        return w
    floor, decay = 0.03 / steps, epoch / (steps * msl_epochs)
    w[:-1] = max(1.0 / steps - decay, floor)
    w[-1] = 1.0 - w[:-1].sum()
    return w


class MAMLPlusPlus:
    """MAML++ over any ``nn.Module``; see the module docstring. Other arguments as ``MAML``."""

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 5,
                 first_order: bool = False, loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse",
                 kind: str | None = None, test_inner_steps: int | None = None, msl: bool = True,
                 msl_epochs: int = 10, lslr: bool = True, per_step_bn: bool = True,
                 first_order_epochs: int = 0, epoch_iterations: int = 500, strategy: str = "auto",
                 chunk_size: int | None = None, name: str = "mamlpp", bn_mode: str = "transductive"):
        if inner_steps < 1:
            raise ValueError("MAML++ needs inner_steps >= 1")
        self.loss_fn, self.kind = resolve_loss(loss_fn, kind)
        self.model, self.name = model, name
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.msl, self.msl_epochs, self.first_order_epochs = msl, msl_epochs, first_order_epochs
        self.epoch_iterations, self.step, self.bn_mode = epoch_iterations, 0, bn_mode
        params = dict(model.named_parameters())
        norm_names = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, NORMS)
                      for p, _ in mod.named_parameters(recurse=False)}
        # Copy k of every norm parameter is used at step k (k = 0..K).
        self.bn = {k: nn.Parameter(torch.stack([params[k].detach()] * (inner_steps + 1)))
                   for k in params if per_step_bn and k in norm_names}
        self.lrs = {k: nn.Parameter(torch.full((inner_steps,), inner_lr, dtype=p.dtype, device=p.device))
                    for k, p in params.items() if lslr and k not in self.bn}
        device = next(model.parameters()).device
        self.strategy = strategies.choose_strategy(strategy, model, device, chunk_size)

    def set_step(self, step: int) -> None:
        """Called by the trainer before each meta-iteration: drives MSL and derivative-order annealing."""
        self.step = step

    @property
    def epoch(self) -> int:
        return self.step // self.epoch_iterations

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        own = {k: v for k, v in self.model.named_parameters() if k not in self.bn}
        return {**own, **{"inner_lr/" + k: v for k, v in self.lrs.items()},
                **{"bn/" + k: v for k, v in self.bn.items()}}

    def buffers(self) -> dict[str, Tensor]:
        return named_buffers(self.model)

    def _rule(self, lrs: dict[str, Tensor], bn: dict[str, Tensor]) -> InnerRule:
        """LSLR (or plain SGD) on the parameters; the norm copies are *set* to the next step's."""
        base, last = per_step_sgd(lrs) if lrs else sgd(self.inner_lr), self.inner_steps

        def update(grads, state, params, step):
            new, state = base.update(grads, state, {k: p for k, p in params.items() if k not in bn}, step)
            return new | {k: bn[k][min(step + 1, last)] for k in bn}, state

        return InnerRule(init=base.init, update=update)

    def _start(self, detach: bool) -> tuple[dict[str, Tensor], InnerRule]:
        """θ0 (norm parameters: the step-0 copies) and the inner rule over the current extras."""
        d = (lambda t: t.detach()) if detach else (lambda t: t)
        bn = {k: d(v) for k, v in self.bn.items()}
        params = {k: d(v) for k, v in named_params(self.model).items()} | {k: v[0] for k, v in bn.items()}
        return params, self._rule({k: d(v) for k, v in self.lrs.items()}, bn)

    def _task_fn(self, detach: bool, steps: int, first_order: bool, objective):
        params, rule = self._start(detach)
        return make_task_fn(self.model, params, self.buffers(), loss_fn=self.loss_fn, rule=rule, steps=steps,
                            first_order=first_order, objective=with_bn_mode(objective, self.bn_mode))

    def _train_fn(self):
        first_order = self.first_order or self.epoch < self.first_order_epochs
        p = next(self.model.parameters())
        weights = msl_weights(self.inner_steps, self.epoch, self.msl_epochs, p.dtype).to(p.device)
        objective = multi_step_objective(weights) if self.msl else query_objective
        return self._task_fn(False, self.inner_steps, first_order, objective)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses, preds = strategies.map_tasks(self._train_fn(), batch, self.strategy)
        return losses.mean(), strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        losses, preds = strategies.backward_tasks(self._train_fn(), batch, self.strategy, weight,
                                              self.meta_parameters().values())
        return strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt to one task with the learned rates; all parameters (norms: last step's copy), detached."""
        steps = self.test_inner_steps if steps is None else steps
        params, rule = self._start(detach=True)
        loss = support_loss_fn(self.model, self.loss_fn, {}, self.buffers())
        path = adapt_path(loss, params, support_x, support_y, rule=rule, steps=steps, first_order=True)
        return {k: v.detach() for k, v in path[-1].items()}

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        fn = self._task_fn(True, steps, first_order=True, objective=path_objective(self.kind))
        losses, accs = strategies.map_tasks(fn, batch, self.strategy)
        return losses.detach(), accs.detach()


@register("mamlpp", uses=frozenset({"first_order", "msl", "msl_epochs", "lslr", "per_step_bn", "first_order_epochs",
                          "epoch_iterations"}))
def build(model: nn.Module, cfg) -> MAMLPlusPlus:
    """MAML++ (Antoniou et al. 2019): MSL, LSLR, per-step BN, derivative-order and meta-rate annealing."""
    return MAMLPlusPlus(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                        first_order=cfg.first_order, loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps,
                        msl=cfg.msl, msl_epochs=cfg.msl_epochs, lslr=cfg.lslr, per_step_bn=cfg.per_step_bn,
                        first_order_epochs=cfg.first_order_epochs, epoch_iterations=cfg.epoch_iterations,
                        strategy=cfg.strategy, chunk_size=cfg.chunk_size or None, bn_mode=cfg.bn_mode)
