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
Evaluation and ``adapt`` solve the same proximal problem from θ, as in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mamlkit.algorithms import register
from mamlkit.algorithms.driver import Driver, Pieces
from mamlkit.engine.functional import Params
from mamlkit.engine.inner import adapt_final, conjugate_gradient, proximal
from mamlkit.engine.norms import with_bn_mode
from mamlkit.engine.rules import InnerRule, described, sgd
from mamlkit.exec.executor import Executor


def implicit_outer(lam: float, cg_steps: int):
    """Per task: φ of the proximal problem with no graph, and the surrogate whose gradient is
    (I + H/λ)⁻¹ ∇L_q(φ) (see the module docstring)."""

    def build(learner: Driver, theta: Params, rule: InnerRule, *, steps: int, first_order: bool, objective):
        loss, query = learner.support_loss(), with_bn_mode(objective, learner.bn_mode)

        def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            anchor = {k: v.detach() for k, v in theta.items()}
            phi = adapt_final(proximal(loss, anchor, lam), anchor, sx, sy, rule=rule, steps=steps)

            def query_loss(fast: Params):
                return query([fast], loss, sx, sy, qx, qy, predict=learner.predict, loss_fn=learner.loss_fn)

            grad_q, (q_loss, pred) = torch.func.grad_and_value(query_loss, has_aux=True)(phi)
            # Hessian-vector products of the support loss at φ (reverse over reverse; H is symmetric).
            _, hvp = torch.func.vjp(lambda f: torch.func.grad(loss)(f, sx, sy), phi)

            def matvec(v: Params) -> Params:
                hv = hvp(v)[0]
                return {k: v[k] + hv[k] / lam for k in v}

            g = conjugate_gradient(matvec, grad_q, cg_steps)
            surrogate = sum((theta[k] * g[k].detach()).sum() for k in theta)
            return q_loss.detach() + surrogate - surrogate.detach(), pred.detach()

        return task_fn

    return build


def IMAML(model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 10, lam: float = 1.0, cg_steps: int = 5,
          loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse", kind: str | None = None,
          test_inner_steps: int | None = None, name: str = "imaml", bn_mode: str = "transductive",
          executor: Executor | None = None, **execution) -> Driver:
    """iMAML over any ``nn.Module``.

    Args:
        inner_lr, inner_steps: SGD on the proximal inner objective (rate α, steps).
        lam: λ, the proximal strength (the paper's regulariser, Eq. 4).
        cg_steps: conjugate-gradient iterations for (I + H/λ)⁻¹ ∇L_q.
    Other arguments as :func:`~mamlkit.algorithms.maml.MAML`.
    """
    if lam <= 0 or cg_steps < 1:
        raise ValueError(f"iMAML needs lam > 0 and cg_steps >= 1, got {lam}, {cg_steps}")
    text = f"SGD at α={inner_lr:g} on the proximal objective L + λ/2·‖φ − θ‖², λ={lam:g}"
    pieces = Pieces(name=name, inner_steps=inner_steps, test_inner_steps=test_inner_steps, inner_lr=inner_lr,
                    rule=lambda extras: described(sgd(inner_lr), text),
                    inner_loss=lambda loss, anchor: proximal(loss, anchor, lam), outer=implicit_outer(lam, cg_steps))
    return Driver(model, pieces, loss_fn=loss_fn, kind=kind, bn_mode=bn_mode, executor=executor, **execution)


@register("imaml")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """iMAML (Rajeswaran et al. 2019): implicit meta-gradient by conjugate gradient, proximal inner loop."""
    return IMAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, lam=cfg.imaml_lambda,
                 cg_steps=cfg.cg_steps, loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps,
                 bn_mode=cfg.bn_mode, executor=executor, output=cfg.output_spec)
