"""Trust-region policy optimisation (Schulman et al. 2015) over any differentiable objective.

The objective and the KL are given as one closure of the meta-parameters, so the same step
serves plain TRPO (joint training) and MAML-TRPO, where both go through the inner
policy-gradient step: there the Fisher-vector products are Hessian-vector products of the
post-adaptation KL with respect to the *pre-adaptation* parameters (Finn et al. 2017, §5.3).
A caller that knows its objective's structure may pass a :class:`Linearization` instead (the loss,
gradient and Fisher products at θ_old, computed its own way); the line search still uses the closure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def conjugate_gradient(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       tol: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite A given only ``v -> A v``.

    ``b [n]`` -> ``x [n]`` after at most ``iters`` conjugate-gradient iterations (Nocedal & Wright,
    Alg. 5.2), stopping early once the squared residual is below ``tol``.
    """
    return solve_cg(Avp, b, iters, tol)[0]


def solve_cg(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, tol: float = 1e-10
             ) -> tuple[Tensor, Tensor]:
    """:func:`conjugate_gradient`, also returning ``A x``: the sum Σ α_k A p_k of the products CG made
    (by linearity, ``A x`` without another product; TRPO needs ``xᵀA x`` for its step length)."""
    x = torch.zeros_like(b)
    Ax = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        Ax = Ax + alpha * Ap
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, Ax


def fisher_vector_product(kl: Tensor, params: Sequence[Tensor], damping: float = 0.0
                          ) -> Callable[[Tensor], Tensor]:
    """``v -> (∇²_θ KL) v + damping·v``, by differentiating ``∇_θ KL · v`` (Pearlmutter's trick).

    ``kl`` is a scalar with a graph to ``params``; at θ = θ_old its Hessian is the Fisher
    information of the (post-adaptation) policy, pulled back through the inner step.
    The first-order graph of ``∇KL`` is built once and reused for every product.
    """
    grads = flat(torch.autograd.grad(kl, params, create_graph=True))

    def fvp(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grads @ v, params, retain_graph=True)
        return flat(hv).detach() + damping * v

    return fvp


def damped(fvp: Callable[[Tensor], Tensor], damping: float) -> Callable[[Tensor], Tensor]:
    """``v -> fvp(v) + damping·v``: the damped Fisher, (F + λI) v."""
    return lambda v: fvp(v) + damping * v


def set_flat(params: Sequence[Tensor], vector: Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in params:
            p.copy_(vector[i:i + p.numel()].view_as(p))
            i += p.numel()


@dataclass(frozen=True)
class Linearization:
    """What one TRPO step needs at θ_old: the loss, its gradient ``grad [n]`` and ``fvp: v [n] -> F v [n]``,
    the product with the Fisher (the KL's Hessian; undamped)."""

    loss: Tensor
    grad: Tensor
    fvp: Callable[[Tensor], Tensor]


def autograd_linearization(params: Sequence[Tensor], objective: Callable[[], tuple[Tensor, Tensor]],
                           fisher_kl: Callable[[], Tensor] | None = None) -> Linearization:
    """:class:`Linearization` of any ``objective() -> (loss, kl)`` by autograd: the gradient of the loss
    and the Hessian of the KL (or of ``fisher_kl()``) by :func:`fisher_vector_product`."""
    loss, kl = objective()
    g = flat(torch.autograd.grad(loss, params, retain_graph=True)).detach()
    return Linearization(loss.detach(), g, fisher_vector_product(kl if fisher_kl is None else fisher_kl(), params))


def trpo_step(params: Sequence[Tensor], objective: Callable[[], tuple[Tensor, Tensor]], *,
              max_kl: float = 0.01, damping: float = 1e-5, cg_iters: int = 10, ls_steps: int = 15,
              ls_ratio: float = 0.8, fisher_kl: Callable[[], Tensor] | None = None,
              linearize: Callable[[], Linearization] | None = None) -> dict[str, float]:
    """One TRPO update of ``params`` in place: minimise the surrogate loss subject to KL <= ``max_kl``.

    ``objective()`` returns ``(loss, kl)`` (scalars; kl(θ_old) = 0) computed at the current values of
    ``params``. The natural-gradient direction s solves F s = −∇loss by conjugate gradient; the step
    √(2 δ / sᵀFs)·s is shrunk by ``ls_ratio`` until the loss improves and the KL is <= ``max_kl``;
    if no step qualifies the parameters are left unchanged. ``fisher_kl()``, if given, is the KL
    whose Hessian is used as the Fisher (e.g. on a subset of the data, to save time). ``linearize()``,
    if given, supplies the loss, gradient and Fisher products at θ_old instead of autograd on
    ``objective`` (a faster route to the same numbers); ``objective`` still drives the line search.
    Returns the loss/KL before and after and the number of backtracks (``ls_steps`` when rejected).
    """
    if linearize is not None and fisher_kl is not None:
        raise ValueError("give fisher_kl or linearize, not both: linearize supplies the Fisher products")
    params = list(params)
    clock = time.perf_counter()
    lin = autograd_linearization(params, objective, fisher_kl) if linearize is None else linearize()
    g, Avp = lin.grad, damped(lin.fvp, damping)
    s, Fs = solve_cg(Avp, -g, iters=cg_iters)
    shs = s @ Fs
    old = flat([p.detach() for p in params]).clone()
    stats = {"loss_before": lin.loss.item(), "grad_norm": g.norm().item(),
             "time_cg_s": time.perf_counter() - clock}  # gradient, Fisher graph, CG products
    del lin, Avp  # the graphs behind the products are not needed by the line search
    if not torch.isfinite(shs) or shs <= 0:
        return stats | {"loss": stats["loss_before"], "kl": 0.0, "backtracks": ls_steps}
    full = math.sqrt(2 * max_kl / shs.item()) * s
    try:
        for k in range(ls_steps):
            set_flat(params, old + (ls_ratio ** k) * full)
            with torch.no_grad():
                new_loss, new_kl = objective()
            improved = torch.isfinite(new_loss) and new_loss.item() < stats["loss_before"]
            if improved and new_kl.item() <= max_kl:
                return stats | {"loss": new_loss.item(), "kl": new_kl.item(), "backtracks": k}
    except BaseException:  # e.g. Ctrl-C: never leave a trial point behind (it would be checkpointed)
        set_flat(params, old)
        raise
    set_flat(params, old)
    return stats | {"loss": stats["loss_before"], "kl": 0.0, "backtracks": ls_steps}
