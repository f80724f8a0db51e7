"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019, arXiv:1909.04630).

Pieces: every parameter adapts; the inner problem is proximal,
φ*(θ) = argmin_φ L_s(φ) + λ/2 ‖φ − θ‖² (:func:`~mamlkit.engine.inner.proximal`), solved approximately
by ``inner_steps`` steps of SGD at α from φ = θ with no graph (:func:`~mamlkit.engine.inner.adapt_final`);
the outer objective is the query loss at φ, differentiated implicitly: at a stationary point,
dφ*/dθ = (I + ∇²L_s(φ)/λ)⁻¹, so the meta-gradient is g = (I + H/λ)⁻¹ ∇L_q(φ) (paper, Lemma 1),
computed with ``cg_steps`` iterations of conjugate gradient on Hessian-vector products at φ.
No step of the inner loop is kept, so memory does not depend on the number of inner steps.

g enters autograd through the surrogate ⟨θ, stopgrad(g)⟩ (value replaced by the query loss),
so ``meta_loss``/``meta_backward`` and both execution strategies work unchanged.
Evaluation and :meth:`adapt` solve the same proximal problem from θ, as in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mamlkit.algorithms import register, resolve_loss
from mamlkit.base.batch import TaskBatch
from mamlkit.engine.functional import call, named_buffers, named_params
from mamlkit.engine.inner import (
    Params,
    adapt_final,
    adapt_path,
    conjugate_gradient,
    fresh,
    path_objective,
    proximal,
    query_objective,
    support_loss_fn,
)
from mamlkit.engine.norms import with_bn_mode
from mamlkit.engine.rules import sgd
from mamlkit.exec import strategies


class IMAML:
    """iMAML over any ``nn.Module``.

    Args:
        inner_lr, inner_steps: SGD on the proximal inner objective (rate α, steps).
        lam: λ, the proximal strength (the paper's regulariser, Eq. 4).
        cg_steps: conjugate-gradient iterations for (I + H/λ)⁻¹ ∇L_q.
    Other arguments as :class:`~mamlkit.algorithms.maml.MAML`.
    """

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 10, lam: float = 1.0,
                 cg_steps: int = 5, loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse",
                 kind: str | None = None, test_inner_steps: int | None = None, strategy: str = "auto",
                 chunk_size: int | None = None, name: str = "imaml", bn_mode: str = "transductive"):
        if lam <= 0 or cg_steps < 1:
            raise ValueError(f"iMAML needs lam > 0 and cg_steps >= 1, got {lam}, {cg_steps}")
        self.loss_fn, self.kind = resolve_loss(loss_fn, kind)
        self.model, self.name = model, name
        self.inner_lr, self.inner_steps, self.lam, self.cg_steps = inner_lr, inner_steps, lam, cg_steps
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.bn_mode = bn_mode  # "support": query predictions use support-set BN statistics (mamlkit.engine.norms)
        device = next(model.parameters()).device
        self.strategy = strategies.choose_strategy(strategy, model, device, chunk_size)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def buffers(self) -> dict[str, Tensor]:
        return named_buffers(self.model)

    def _predict(self, fast: Params, x: Tensor) -> Tensor:
        return call(self.model, fast, fresh(self.buffers()), x)

    def implicit_task_fn(self, theta: Params):
        """``fn(sx, sy, qx, qy) -> (surrogate loss, query_pred)``; see the module docstring."""
        loss = support_loss_fn(self.model, self.loss_fn, {}, self.buffers())
        lam, rule, query = self.lam, sgd(self.inner_lr), with_bn_mode(query_objective, self.bn_mode)

        def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            anchor = {k: v.detach() for k, v in theta.items()}
            phi = adapt_final(proximal(loss, anchor, lam), anchor, sx, sy, rule=rule, steps=self.inner_steps)

            def query_loss(fast: Params):
                return query([fast], loss, sx, sy, qx, qy, predict=self._predict, loss_fn=self.loss_fn)

            grad_q, (q_loss, pred) = torch.func.grad_and_value(query_loss, has_aux=True)(phi)
            # Hessian-vector products of the support loss at φ (reverse over reverse; H is symmetric).
            _, hvp = torch.func.vjp(lambda f: torch.func.grad(loss)(f, sx, sy), phi)

            def matvec(v: Params) -> Params:
                hv = hvp(v)[0]
                return {k: v[k] + hv[k] / lam for k in v}

            g = conjugate_gradient(matvec, grad_q, self.cg_steps)
            surrogate = sum((theta[k] * g[k].detach()).sum() for k in theta)
            return q_loss.detach() + surrogate - surrogate.detach(), pred.detach()

        return task_fn

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean query loss at φ; its ``.backward()`` writes the implicit meta-gradient into ``.grad``."""
        fn = self.implicit_task_fn(named_params(self.model))
        losses, preds = strategies.map_tasks(fn, batch, self.strategy)
        return losses.mean(), strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        fn = self.implicit_task_fn(named_params(self.model))
        losses, preds = strategies.backward_tasks(fn, batch, self.strategy, weight,
                                              self.meta_parameters().values())
        return strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """φ for one task: SGD on the proximal objective from θ; every parameter, detached."""
        steps = self.test_inner_steps if steps is None else steps
        theta = {k: v.detach() for k, v in named_params(self.model).items()}
        loss = proximal(support_loss_fn(self.model, self.loss_fn, {}, self.buffers()), theta, self.lam)
        return adapt_final(loss, theta, support_x, support_y, rule=sgd(self.inner_lr), steps=steps)

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        theta = {k: v.detach() for k, v in named_params(self.model).items()}
        loss = proximal(support_loss_fn(self.model, self.loss_fn, {}, self.buffers()), theta, self.lam)
        objective = with_bn_mode(path_objective(self.kind), self.bn_mode)

        def fn(sx, sy, qx, qy):
            path = adapt_path(loss, theta, sx, sy, rule=sgd(self.inner_lr), steps=steps, first_order=True)
            return objective(path, loss, sx, sy, qx, qy, predict=self._predict, loss_fn=self.loss_fn)

        losses, accs = strategies.map_tasks(fn, batch, self.strategy)
        return losses.detach(), accs.detach()


@register("imaml", uses=frozenset({"imaml_lambda", "cg_steps"}))
def build(model: nn.Module, cfg) -> IMAML:
    """iMAML (Rajeswaran et al. 2019): implicit meta-gradient by conjugate gradient, proximal inner loop."""
    return IMAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, lam=cfg.imaml_lambda,
                 cg_steps=cfg.cg_steps, loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps,
                 strategy=cfg.strategy, chunk_size=cfg.chunk_size or None, bn_mode=cfg.bn_mode)
