"""Inner update rules as ``(init, update)`` pairs, in the style of optax.

A rule turns the inner-loop gradient into new parameters. ``init(params)`` builds the rule's
state; ``update(grads, state, params, step)`` returns ``(new_params, new_state)``. Rules are
pure functions of their inputs; learned quantities (Meta-SGD's per-parameter rates, MAML++'s
per-step rates) are tensors the rule closes over, so the meta-gradient reaches them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

Params = dict[str, Tensor]


class InnerRule(NamedTuple):
    """An inner-loop optimiser: ``init(params) -> state`` and
    ``update(grads, state, params, step) -> (params, state)``."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params, int], tuple[Params, Any]]


def sgd(lr: float) -> InnerRule:
    """Plain gradient descent, θ ← θ − α∇L (Finn et al. 2017, Eq. 1)."""

    def update(grads: Params, state: Any, params: Params, step: int) -> tuple[Params, Any]:
        return {k: p - lr * grads[k] for k, p in params.items()}, state

    return InnerRule(init=lambda params: None, update=update)


def per_parameter_sgd(lrs: Mapping[str, Tensor]) -> InnerRule:
    """θ ← θ − α ⊙ ∇L with a learned rate tensor per parameter (Meta-SGD, Li et al. 2017).

    ``lrs[name]`` has the shape of the parameter (or broadcasts to it).
    """

    def update(grads: Params, state: Any, params: Params, step: int) -> tuple[Params, Any]:
        return {k: p - lrs[k] * grads[k] for k, p in params.items()}, state

    return InnerRule(init=lambda params: None, update=update)


def per_step_sgd(lrs: Mapping[str, Tensor]) -> InnerRule:
    """θ ← θ − α_{l,k} ∇_l L at step k: a learned rate per layer and per step (MAML++'s LSLR,
    Antoniou et al. 2019, §4). ``lrs[name]`` has shape ``[K]``; steps beyond K reuse the last rate."""

    def update(grads: Params, state: Any, params: Params, step: int) -> tuple[Params, Any]:
        return {k: p - lrs[k][min(step, lrs[k].shape[0] - 1)] * grads[k] for k, p in params.items()}, state

    return InnerRule(init=lambda params: None, update=update)


def adam(lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> InnerRule:
    """Adam as an inner rule (Kingma & Ba 2015), with fresh moments per task. The default β1 = 0
    is Reptile's inner optimiser (Nichol et al. 2018, §6). State: ``(m, v)`` dicts like params."""
    b1, b2 = betas

    def init(params: Params) -> Any:
        zeros = {k: p.detach() * 0 for k, p in params.items()}
        return zeros, dict(zeros)

    def update(grads: Params, state: Any, params: Params, step: int) -> tuple[Params, Any]:
        m = {k: b1 * state[0][k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state[1][k] + (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
        new = {k: p - lr * (m[k] / c1) / ((v[k] / c2).sqrt() + eps) for k, p in params.items()}
        return new, (m, v)

    return InnerRule(init=init, update=update)
