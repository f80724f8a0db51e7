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
