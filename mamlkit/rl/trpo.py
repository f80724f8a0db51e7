"""Trust-region policy optimisation (Schulman et al. 2015) over any differentiable objective.

The objective and the KL are given as one closure of the meta-parameters, so the same step
serves plain TRPO (joint training) and MAML-TRPO, where both go through the inner
policy-gradient step: there the Fisher-vector products are Hessian-vector products of the
post-adaptation KL with respect to the *pre-adaptation* parameters (Finn et al. 2017, §5.3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

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
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


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


def set_flat(params: Sequence[Tensor], vector: Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in params:
            p.copy_(vector[i:i + p.numel()].view_as(p))
            i += p.numel()


def trpo_step(params: Sequence[Tensor], objective: Callable[[], tuple[Tensor, Tensor]], *,
              max_kl: float = 0.01, damping: float = 1e-5, cg_iters: int = 10, ls_steps: int = 15,
              ls_ratio: float = 0.8,
              fisher_kl: Callable[[], Tensor] | None = None) -> dict[str, float]:
    """One TRPO update of ``params`` in place: minimise the surrogate loss subject to KL <= ``max_kl``.

    ``objective()`` returns ``(loss, kl)`` (scalars; kl(θ_old) = 0) computed at the current values of
    ``params``. The natural-gradient direction s solves F s = −∇loss by conjugate gradient; the step
    √(2 δ / sᵀFs)·s is shrunk by ``ls_ratio`` until the loss improves and the KL is <= ``max_kl``;
    if no step qualifies the parameters are left unchanged. ``fisher_kl()``, if given, is the KL
    whose Hessian is used as the Fisher (e.g. on a subset of the data, to save time). Returns the
    loss/KL before and after and the number of backtracks (``ls_steps`` when rejected).
    """
    params = list(params)
    clock = time.perf_counter()
    loss, kl = objective()
    g = flat(torch.autograd.grad(loss, params, retain_graph=True)).detach()
    fvp = fisher_vector_product(kl if fisher_kl is None else fisher_kl(), params, damping)
    s = conjugate_gradient(fvp, -g, iters=cg_iters)
    shs = s @ fvp(s)
    old = flat([p.detach() for p in params]).clone()
    stats = {"loss_before": loss.item(), "grad_norm": g.norm().item(),
             "time_cg_s": time.perf_counter() - clock}  # gradient, Fisher graph, CG products
    if not torch.isfinite(shs) or shs <= 0:
        return stats | {"loss": loss.item(), "kl": 0.0, "backtracks": ls_steps}
    full = math.sqrt(2 * max_kl / shs.item()) * s
    del loss, kl, fvp
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
