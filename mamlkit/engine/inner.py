"""The inner loop: K steps of an update rule on the support loss, as one pure function.

``adapt_path`` is the only inner loop in mamlkit. Training (through the meta-loss) and
evaluation (``MAML.adapt``, ``evaluate``) both call it, so the model that is evaluated is
adapted exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mamlkit.base.patterns import compile_patterns
from mamlkit.base.stops import stop_point
from mamlkit.engine.exact import note_model
from mamlkit.engine.functional import Params, call
from mamlkit.engine.outputs import OutputSelector, OutputSpec, output_selector
from mamlkit.engine.rules import InnerRule, apply_updates, was_halved

LossFn = Callable[[Tensor, Tensor], Tensor]


def fresh(buffers: Mapping[str, Tensor]) -> Params:
    """Copies of ``buffers`` that a forward pass may update without side effects."""
    return {k: b.clone() for k, b in buffers.items()}


def support_loss_fn(model: nn.Module, loss_fn: LossFn, shared: Mapping[str, Tensor],
                    buffers: Mapping[str, Tensor], output: OutputSpec | OutputSelector = None
                    ) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """``L(fast, x, y)``: the loss of ``model`` with ``fast`` params (``shared`` fill the rest), on the tensor
    that ``output`` selects from the model's output (:mod:`mamlkit.engine.outputs`).

    Buffers are copied on every call: a module may update them in place (BatchNorm's
    ``num_batches_tracked``), which a function transform forbids on captured tensors and which
    would make results depend on the execution strategy. The model's own buffers never change.
    """
    select = output_selector(output)

    def loss(fast: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(select(call(model, {**shared, **fast}, fresh(buffers), x)), y)

    return loss


def trainable_filter(model: nn.Module, adapt_filter: Callable[[str], bool] | None = None
                     ) -> Callable[[str], bool] | None:
    """``adapt_filter`` that also leaves out the parameters the user froze (``requires_grad=False``): a frozen
    pretrained part stays as it is, in the inner loop as in the outer one. ``None`` when nothing is filtered."""
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    if not frozen:
        return adapt_filter
    return lambda name: name not in frozen and (adapt_filter is None or adapt_filter(name))


def name_filter(patterns: Sequence[str]) -> Callable[[str], bool] | None:
    """A parameter-name filter from glob patterns (``head.*``, ``*.layer.5.*``) or regular expressions
    (``encoder\\.layer\\.[45]\\..*``), matched against the whole name: a name passes when any pattern
    matches it either way. ``None`` (every parameter) for no patterns. Regex features that need backtracking
    (backreferences, lookarounds) are refused (:mod:`mamlkit.base.patterns`)."""
    if not patterns:
        return None
    # Never Python's backtracking ``re``: a pattern may come from a checkpoint someone else wrote, and
    # ``(.*.*.*.*.*.*.*.*.*.*)*X`` would never return. Matched in linear time, bounded in size.
    return compile_patterns(patterns)


def check_patterns(names: Sequence[str], patterns: Sequence[str]) -> None:
    """Raise ``ValueError`` naming a pattern that matches none of ``names`` (a typo would adapt nothing)."""
    for pattern in patterns:
        passes = compile_patterns([pattern])
        if not any(passes(n) for n in names):
            sample = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"--adapt {pattern!r} matches no parameter of the model; its parameters are {sample}")


def split_params(params: Mapping[str, Tensor], adapt_filter: Callable[[str], bool] | None
                 ) -> tuple[Params, Params]:
    """``(fast, shared)``: the parameters that adapt (name passes ``adapt_filter``) and the rest."""
    fast = {k: v for k, v in params.items() if adapt_filter is None or adapt_filter(k)}
    return fast, {k: v for k, v in params.items() if k not in fast}


class Path(list):
    """The parameters after each inner step, ``[θ0, θ1, ..., θK]``, with ``states``: the rule's state after
    each step (``[K]``; a :func:`~mamlkit.engine.rules.descent_guard` records there which steps it halved)."""

    states: list


def adapt_path(
    loss: Callable[[Params, Tensor, Tensor], Tensor],
    fast: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    rule: InnerRule,
    steps: int,
    first_order: bool = False,
    checkpoint: bool = False,
) -> Path:
    """Run ``steps`` inner updates and return the parameters after each: ``[θ0, θ1, ..., θK]``.

    Args:
        loss: ``loss(params, x, y) -> scalar``; see :func:`support_loss_fn`.
        fast: the adapted subset of parameters at θ0 (a name filter chose them).
        support_x: ``[N, *x_shape]`` support inputs of one task.
        support_y: ``[N, *y_shape]`` support targets.
        rule: the update rule, e.g. :func:`mamlkit.engine.rules.sgd` or a composition of rules; it is given
            the ``step`` and ``value_fn`` (the support loss of a parameter dict) keywords.
        steps: K, the number of inner steps (0 returns ``[θ0]``).
        first_order: drop the second-order terms (FOMAML): the inner gradient is treated as
            a constant, so dθ_K/dθ_0 = I.
        checkpoint: gradient-checkpoint every step (Chen et al. 2016, arXiv:1604.06174): keep only
            θ_k and recompute step k's graph when the meta-gradient reaches it, so second-order
            memory no longer grows with ``steps``, for about one more forward and backward per step.
            Runs outside ``torch.vmap`` only (the loop strategy); the numbers are unchanged.

    The gradient is taken with :func:`torch.func.grad`, which works both per task and under
    ``torch.vmap``; with ``first_order=False`` the graph through every step is kept, so the
    meta-gradient contains the exact Jacobian Π_k (I − α∇²L(θ_k)) (Finn et al. 2017, Eq. 1).
    """
    path = Path([fast])
    path.states = []
    for theta, state in _iterate(loss, fast, support_x, support_y, rule=rule, steps=steps, first_order=first_order,
                                 checkpoint=checkpoint):
        path.append(theta)
        path.states.append(state)
    return path


def _iterate(loss: Callable[[Params, Tensor, Tensor], Tensor], fast: Params, support_x: Tensor, support_y: Tensor,
             *, rule: InnerRule, steps: int, first_order: bool, checkpoint: bool = False,
             detach: bool = False) -> Iterator[tuple[Params, object]]:
    """The inner loop itself: yields ``(θ_k, rule state)`` after each of ``steps`` updates. ``detach``: no graph
    is kept between steps (:func:`adapt_final`)."""
    grad_fn = torch.func.grad(loss)

    def value_fn(params: Params) -> Tensor:
        return loss(params, support_x, support_y)

    def one_step(fast: Params, state, step: int):
        if _autograd_ok(fast):
            # Outside function transforms (the loop strategy), the autograd engine's double backward
            # is the same mathematics and up to 3× faster than torch.func.grad for Conv nets with
            # max-pooling (benchmarks/RESULTS.md).
            values = list(fast.values())
            gs = torch.autograd.grad(value_fn(fast), values, create_graph=not first_order, allow_unused=True)
            # a parameter the forward does not reach (BERT's pooler under a head on the hidden states) has
            # gradient zero, as torch.func.grad gives it: it adapts to itself
            grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(fast.items(), gs)}
        else:
            grads = grad_fn(fast, support_x, support_y)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
        updates, state = rule.update(grads, state, fast, step=step, value_fn=value_fn)
        return apply_updates(fast, updates), state

    if detach:
        fast = {k: v.detach() for k, v in fast.items()}
    state = rule.init(fast)
    for step in range(steps):
        _stop_point()
        if checkpoint and torch.is_grad_enabled() and any(t.requires_grad for t in fast.values()):
            fast, state = _checkpointed(one_step, fast, state, step)
        else:
            fast, state = one_step(fast, state, step)
        if detach:
            fast = {k: v.detach() for k, v in fast.items()}
        yield fast, state


def _stop_point() -> None:
    """Where a stop signal may end validation or evaluation (:mod:`mamlkit.base.stops`); never inside a
    compiled graph, where it would only be traced."""
    if not torch.compiler.is_compiling():
        stop_point()


def _autograd_ok(fast: Params) -> bool:
    """True when the inner gradient can come from ``torch.autograd.grad``: no torch.func transform is
    active (vmap, grad) and every adapted tensor is in the autograd graph."""
    if torch.compiler.is_compiling():  # inside the compiled strategy's grad transform; asking would break the graph
        return False
    return (torch.is_grad_enabled() and torch._C._functorch.maybe_current_level() is None
            and all(t.requires_grad for t in fast.values()))


def _checkpointed(step_fn: Callable, fast: Params, state, step: int):
    """``step_fn(fast, state, step)`` under a gradient checkpoint (its graph is recomputed in backward)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten
    from torch.utils.checkpoint import checkpoint

    leaves, spec = tree_flatten((fast, state))

    def flat_step(*xs):
        out_fast, out_state = step_fn(*tree_unflatten(list(xs), spec), step)
        out, out_spec = tree_flatten((out_fast, out_state))
        flat_step.spec = out_spec
        return tuple(out)

    # the re-entrant form under torch.func transforms, which refuse the other's saved-tensor hooks; the
    # non-re-entrant form otherwise, since only it allows torch.autograd.grad (the threads strategy's backward)
    reentrant = torch._C._functorch.maybe_current_level() is not None
    out = checkpoint(flat_step, *leaves, use_reentrant=reentrant)
    return tree_unflatten(list(out), flat_step.spec)


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
                 objective: Objective = query_objective, checkpoint: bool = False,
                 inner: Callable[[Callable, Params], Callable] | None = None,
                 output: OutputSpec | OutputSelector = None) -> Callable:
    """The per-task function ``fn(sx, sy, qx, qy) -> (loss, query_pred)`` that every strategy runs.

    Parameters whose name passes ``adapt_filter`` (all, by default) and that are not frozen
    (``requires_grad=False``) are adapted; the rest are shared by all tasks and only meta-learned (frozen
    ones not even that). ``checkpoint``: see :func:`adapt_path`. ``inner(loss, θ0)``: the inner objective
    made from the support loss (e.g. :func:`proximal`); default: the support loss. The outer objective sees
    the support loss itself. ``output``: which tensor of the model's output the losses and predictions take
    (:mod:`mamlkit.engine.outputs`), selected here so that the strategies only ever see tensors.

    The function carries ``second_order``: whether its meta-gradient differentiates the inner gradient
    again, which decides where the executor needs exact kernels (:func:`mamlkit.engine.exact.exact_ops`).
    """
    fast0, shared = split_params(params, trainable_filter(model, adapt_filter))
    note_model(model)
    select = output_selector(output)
    loss = support_loss_fn(model, loss_fn, shared, buffers, select)
    inner_loss = loss if inner is None else inner(loss, fast0)

    def predict(fast: Params, x: Tensor) -> Tensor:
        return select(call(model, {**shared, **fast}, fresh(buffers), x))

    def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        path = adapt_path(inner_loss, fast0, sx, sy, rule=rule, steps=steps, first_order=first_order,
                          checkpoint=checkpoint)
        return objective(path, loss, sx, sy, qx, qy, predict=predict, loss_fn=loss_fn)

    task_fn.second_order = not first_order and steps > 0
    return task_fn


def path_objective(kind: str, halvings: bool = False) -> Objective:
    """An evaluation objective: the query loss (and accuracy) after *every* inner step.

    Returns ``(losses [K+1], accuracies [K+1])``; accuracies are zeros for regression. With ``halvings``
    the second output is ``[2, K+1]``: the accuracies, and 1 where a :func:`~mamlkit.engine.rules.descent_guard`
    halved that step (0 at step 0, and where the rule has no guard).
    """

    def objective(path, loss, sx, sy, qx, qy, predict, loss_fn):
        losses, accs = [], []
        for fast in path:
            pred = predict(fast, qx)
            losses.append(loss_fn(pred, qy))
            accs.append((pred.argmax(-1) == qy).float().mean() if kind == "classification"
                        else torch.zeros((), dtype=pred.dtype))
        if not halvings:
            return torch.stack(losses), torch.stack(accs)
        flags = [torch.zeros_like(accs[0])]
        for state in getattr(path, "states", ()):
            flag = was_halved(state)
            flags.append(torch.zeros_like(accs[0]) if flag is None else flag.to(accs[0].dtype))
        return torch.stack(losses), torch.stack([torch.stack(accs), torch.stack(flags)])

    return objective


# --------------------------------------------------------------------------------------
# Pieces for the MAML family (MAML++, Reptile, iMAML)


def multi_step_objective(weights: Tensor) -> Objective:
    """MAML++'s multi-step loss (Antoniou et al. 2019, §4): Σ_k w_k L_q(θ_k) over steps k = 1..K.

    ``weights [K]``; the query predictions returned are those at θ_K.
    """

    def objective(path, loss, sx, sy, qx, qy, predict, loss_fn):
        total = 0.0
        for k, fast in enumerate(path[1:]):
            pred = predict(fast, qx)
            total = total + weights[k] * loss_fn(pred, qy)
        return total, pred

    return objective


def adapt_final(loss: Callable[[Params, Tensor, Tensor], Tensor], fast: Params, support_x: Tensor,
                support_y: Tensor, *, rule: InnerRule, steps: int) -> Params:
    """θ_K after ``steps`` updates, with no graph to θ0 and only the current iterate kept, so memory
    does not grow with ``steps`` (Reptile's and iMAML's inner solve, ``adapt``). The same loop as
    :func:`adapt_path`'s first-order path. Returns detached tensors."""
    final = {k: v.detach() for k, v in fast.items()}
    for adapted, _ in _iterate(loss, final, support_x, support_y, rule=rule, steps=steps, first_order=True,
                               detach=True):
        final = adapted
    return final


def proximal(loss: Callable[[Params, Tensor, Tensor], Tensor], anchor: Params, lam: float
             ) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """``L(φ) + λ/2 ‖φ − anchor‖²``, iMAML's inner objective (Rajeswaran et al. 2019, Eq. 4)."""

    def prox_loss(fast: Params, x: Tensor, y: Tensor) -> Tensor:
        reg = sum(((fast[k] - anchor[k]) ** 2).sum() for k in fast)
        return loss(fast, x, y) + 0.5 * lam * reg

    return prox_loss


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``, from x = 0, with a
    fixed number of CG iterations (Hestenes & Stiefel 1952). No data-dependent branches, so it runs
    under ``torch.vmap``; a converged residual gives zero step sizes instead of 0/0, and so does a
    direction of non-positive curvature (truncated CG)."""

    def dot(u: Params, v: Params) -> Tensor:
        return sum((u[k] * v[k]).sum() for k in u)

    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = dot(r, r)
    live = torch.ones_like(rs, dtype=torch.bool)
    for _ in range(steps):
        ap = matvec(p)
        tiny = torch.finfo(rs.dtype).tiny
        pap = dot(p, ap)
        # Non-positive curvature (a non-convex inner loss with small λ): stop for good, as truncated CG does.
        live = live & (pap > 0)
        alpha = torch.where(live, rs / pap.clamp_min(tiny), torch.zeros_like(pap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = dot(r, r)
        beta = rs_new / rs.clamp_min(tiny)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_new
    return x
