"""The inner loop: K steps of an update rule on the support loss, as one pure function.

``adapt_path`` is the only inner loop in mamlkit. Training (through the meta-loss) and
evaluation (``MAML.adapt``, ``evaluate``) both call it, so the model that is evaluated is
adapted exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from mamlkit.functional import Params, call
from mamlkit.rules import InnerRule

LossFn = Callable[[Tensor, Tensor], Tensor]


def support_loss_fn(model: nn.Module, loss_fn: LossFn, shared: Mapping[str, Tensor],
                    buffers: Mapping[str, Tensor]) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """``L(fast, x, y)``: the loss of ``model`` with ``fast`` params (``shared`` fill the rest)."""

    def loss(fast: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(call(model, {**shared, **fast}, buffers, x), y)

    return loss


def split_params(params: Mapping[str, Tensor], adapt_filter: Callable[[str], bool] | None
                 ) -> tuple[Params, Params]:
    """``(fast, shared)``: the parameters that adapt (name passes ``adapt_filter``) and the rest."""
    fast = {k: v for k, v in params.items() if adapt_filter is None or adapt_filter(k)}
    return fast, {k: v for k, v in params.items() if k not in fast}


def adapt_path(
    loss: Callable[[Params, Tensor, Tensor], Tensor],
    fast: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    rule: InnerRule,
    steps: int,
    first_order: bool = False,
) -> list[Params]:
    """Run ``steps`` inner updates and return the parameters after each: ``[θ0, θ1, ..., θK]``.

    Args:
        loss: ``loss(params, x, y) -> scalar``; see :func:`support_loss_fn`.
        fast: the adapted subset of parameters at θ0 (a name filter chose them).
        support_x: ``[N, *x_shape]`` support inputs of one task.
        support_y: ``[N, *y_shape]`` support targets.
        rule: the update rule, e.g. :func:`mamlkit.rules.sgd`.
        steps: K, the number of inner steps (0 returns ``[θ0]``).
        first_order: drop the second-order terms (FOMAML): the inner gradient is treated as
            a constant, so dθ_K/dθ_0 = I.

    The gradient is taken with :func:`torch.func.grad`, which works both per task and under
    ``torch.vmap``; with ``first_order=False`` the graph through every step is kept, so the
    meta-gradient contains the exact Jacobian Π_k (I − α∇²L(θ_k)) (Finn et al. 2017, Eq. 1).
    """
    grad_fn = torch.func.grad(loss)
    state = rule.init(fast)
    path = [fast]
    for step in range(steps):
        grads = grad_fn(fast, support_x, support_y)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast, state = rule.update(grads, state, fast, step)
        path.append(fast)
    return path


Objective = Callable[..., tuple[Tensor, Tensor]]


def query_objective(path: list[Params], loss: Callable, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                    predict: Callable[[Params, Tensor], Tensor], loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    """MAML's outer objective: the query loss at the adapted parameters θ_K.
    Returns ``(loss, query_predictions)``."""
    pred = predict(path[-1], qx)
    return loss_fn(pred, qy), pred


def make_task_fn(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], *,
                 loss_fn: LossFn, rule: InnerRule, steps: int, first_order: bool,
                 adapt_filter: Callable[[str], bool] | None = None,
                 objective: Objective = query_objective) -> Callable:
    """The per-task function ``fn(sx, sy, qx, qy) -> (loss, query_pred)`` that every strategy runs.

    Parameters whose name passes ``adapt_filter`` (all, by default) are adapted; the rest are
    shared by all tasks and only meta-learned.
    """
    fast0, shared = split_params(params, adapt_filter)
    loss = support_loss_fn(model, loss_fn, shared, buffers)

    def predict(fast: Params, x: Tensor) -> Tensor:
        return call(model, {**shared, **fast}, buffers, x)

    def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        path = adapt_path(loss, fast0, sx, sy, rule=rule, steps=steps, first_order=first_order)
        return objective(path, loss, sx, sy, qx, qy, predict=predict, loss_fn=loss_fn)

    return task_fn


def path_objective(kind: str) -> Objective:
    """An evaluation objective: the query loss (and accuracy) after *every* inner step.

    Returns ``(losses [K+1], accuracies [K+1])``; accuracies are zeros for regression.
    """

    def objective(path, loss, sx, sy, qx, qy, predict, loss_fn):
        losses, accs = [], []
        for fast in path:
            pred = predict(fast, qx)
            losses.append(loss_fn(pred, qy))
            accs.append((pred.argmax(-1) == qy).float().mean() if kind == "classification"
                        else torch.zeros((), dtype=pred.dtype))
        return torch.stack(losses), torch.stack(accs)

    return objective
