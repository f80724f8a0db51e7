"""Inner update rules as ``(init, update)`` pairs that compose, in the style of optax.

A rule turns the inner-loop gradient into an *update*, which :func:`apply_updates` adds to the
parameters: ``init(params)`` builds the rule's state; ``update(grads, state, params, **extra) ->
(updates, state)``. The inner loop passes two extra keywords (optax's "extra args"): ``step``, the
inner step (0-based), and ``value_fn``, the support loss as a function of the parameters; a rule takes
what it needs and ignores the rest. Rules are pure functions of their inputs; learned quantities
(Meta-SGD's per-parameter rates, MAML++'s per-step rates) are tensors the rule closes over, so the
meta-gradient reaches them.

Rules compose: :func:`chain` runs rules one after the other on the updates (``chain(per_step_sgd(rates),
clamp(0.1))``), :func:`scale` multiplies them, :func:`clamp` bounds them, and :func:`descent_guard`
wraps any rule in the test-time safeguard (a step that would raise the support loss is halved). Every
rule says what it does: ``describe()`` is the text reports and ``mamlkit adapt`` print.

Bit-for-bit: an update is ``-(α·g)`` and ``θ + (−x)`` equals ``θ − x`` exactly in IEEE arithmetic, and so do
their derivatives, so the parameters and meta-gradients are those of the earlier ``θ − α·g`` rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]
Updates = dict[str, Any]  # a Tensor added to the parameter, or an Assign that replaces it


class Assign(NamedTuple):
    """An update that sets the parameter to ``value`` instead of adding to it (MAML++'s per-step norm
    copies, which the inner loop sets, not steps): an exact value, where ``θ + (value − θ)`` would round."""

    value: Tensor


class InnerRule(NamedTuple):
    """An inner-loop optimiser: ``init(params) -> state``, ``update(grads, state, params, **extra) ->
    (updates, state)`` and ``describe() -> str``, the rule in words (lazy: a learned rate is read only
    when a report asks)."""

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Updates, Any]]
    describe: Callable[[], str] = lambda: "a custom inner rule"


def apply_updates(params: Params, updates: Updates) -> Params:
    """``θ + u`` for every parameter (an :class:`Assign` sets it); a parameter without an update is kept."""
    out = {}
    for k, p in params.items():
        u = updates.get(k)
        out[k] = p if u is None else u.value if isinstance(u, Assign) else p + u
    return out


def described(rule: InnerRule, text: str | Callable[[], str]) -> InnerRule:
    """``rule`` whose ``describe()`` says ``text`` (an algorithm naming what its rule does in its own terms);
    a callable is asked when a report is written, so a learned value is read then."""
    return rule._replace(describe=text if callable(text) else lambda: text)


def _stateless(update: Callable[..., Updates], describe: Callable[[], str]) -> InnerRule:
    """A rule with no state: ``update(updates, **extra) -> updates``."""
    return InnerRule(init=lambda params: None,
                     update=lambda grads, state, params, **extra: (update(grads, **extra), state),
                     describe=describe)


def _each(updates: Updates, fn: Callable[[str, Tensor], Any]) -> Updates:
    """``fn(name, u)`` on every additive update; an :class:`Assign` passes unchanged."""
    return {k: u if isinstance(u, Assign) else fn(k, u) for k, u in updates.items()}


def _rate(value: float) -> str:
    return f"{value:g}"


def scale(factor: float) -> InnerRule:
    """``u ← factor · u``."""
    return _stateless(lambda updates, **extra: _each(updates, lambda k, u: factor * u),
                      lambda: f"scaled by {_rate(factor)}")


def clamp(bound: float) -> InnerRule:
    """``u ← clamp(u, −bound, bound)`` elementwise: no entry moves by more than ``bound`` in one step."""
    if not bound > 0:
        raise ValueError(f"clamp's bound must be > 0, got {bound}")
    return _stateless(lambda updates, **extra: _each(updates, lambda k, u: u.clamp(-bound, bound)),
                      lambda: f"each entry's step clamped to ±{_rate(bound)}")


def chain(*rules: InnerRule) -> InnerRule:
    """The rules one after the other: the first turns the gradient into an update, each next one transforms
    that update (optax's ``chain``). State: a tuple of the rules' states."""
    if not rules:
        raise ValueError("chain needs at least one rule")

    def init(params: Params) -> tuple:
        return tuple(r.init(params) for r in rules)

    def update(grads: Params, state: tuple, params: Params, **extra) -> tuple[Updates, tuple]:
        states = []
        for r, s in zip(rules, state):
            grads, s = r.update(grads, s, params, **extra)
            states.append(s)
        return grads, tuple(states)

    return InnerRule(init=init, update=update, describe=lambda: ", then ".join(r.describe() for r in rules))


def sgd(lr: float) -> InnerRule:
    """Plain gradient descent, θ ← θ − α∇L (Finn et al. 2017, Eq. 1)."""
    # (−α)·g, not −(α·g): the same number (rounding is symmetric in sign), one operation fewer per step
    return _stateless(lambda grads, **extra: {k: -lr * g for k, g in grads.items()},
                      lambda: f"SGD at α={_rate(lr)}")


def _mean(rates: Mapping[str, Tensor]) -> float:
    """The mean learned rate over every entry, read without a graph (for ``describe``)."""
    with torch.no_grad():
        total = sum(float(r.detach().sum()) for r in rates.values())
        return total / max(sum(r.numel() for r in rates.values()), 1)


def per_parameter_sgd(lrs: Mapping[str, Tensor], label: str = "Meta-SGD") -> InnerRule:
    """θ ← θ − α ⊙ ∇L with a learned rate tensor per parameter (Meta-SGD, Li et al. 2017).

    ``lrs[name]`` has the shape of the parameter (or broadcasts to it). ``label``: the method named in
    ``describe``.
    """
    negated = {k: -r for k, r in lrs.items()}  # once per rule, not per step (see sgd)
    return _stateless(lambda grads, **extra: {k: negated[k] * g for k, g in grads.items()},
                      lambda: f"per-parameter learned rates ({label}), mean {_mean(lrs):.3g}")


def per_step_sgd(lrs: Mapping[str, Tensor]) -> InnerRule:
    """θ ← θ − α_{l,k} ∇_l L at step k: a learned rate per layer and per step (MAML++'s LSLR,
    Antoniou et al. 2019, §4). ``lrs[name]`` has shape ``[K]``; steps beyond K reuse the last rate. A
    parameter without a rate gets no update here (a later rule of a :func:`chain` gives it one)."""

    negated = {k: -r for k, r in lrs.items()}  # once per rule, not per step (see sgd)

    def update(grads: Params, *, step: int = 0, **extra) -> Updates:
        return {k: negated[k][min(step, lrs[k].shape[0] - 1)] * g for k, g in grads.items() if k in lrs}

    return _stateless(update, lambda: f"per-layer, per-step learned rates (MAML++ LSLR), mean {_mean(lrs):.3g}")


def assign_per_step(copies: Mapping[str, Tensor], last: int) -> InnerRule:
    """After step k, set each parameter named in ``copies`` to its copy ``k+1`` (``copies[name]`` is
    ``[last+1, ...]``; later steps keep the last): MAML++'s per-step batch-norm weights, which the inner
    loop sets, not adapts. Other updates pass unchanged."""

    def update(updates: Updates, *, step: int = 0, **extra) -> Updates:
        return {**updates, **{k: Assign(c[min(step + 1, last)]) for k, c in copies.items()}}

    return _stateless(update, lambda: "the norm weights set to each step's learned copy")


def adam(lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> InnerRule:
    """Adam as an inner rule (Kingma & Ba 2015), with fresh moments per task. The default β1 = 0
    is Reptile's inner optimiser (Nichol et al. 2018, §6). State: ``(m, v)`` dicts like params; the
    bias correction reads the ``step`` keyword (0-based)."""
    b1, b2 = betas

    def init(params: Params) -> Any:
        zeros = {k: p.detach() * 0 for k, p in params.items()}
        return zeros, dict(zeros)

    def update(grads: Params, state: Any, params: Params, *, step: int = 0, **extra) -> tuple[Updates, Any]:
        m = {k: b1 * state[0][k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state[1][k] + (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
        return {k: -lr * (m[k] / c1) / ((v[k] / c2).sqrt() + eps) for k in grads}, (m, v)

    return InnerRule(init=init, update=update,
                     describe=lambda: f"Adam at lr={_rate(lr)}, β=({_rate(b1)}, {_rate(b2)}), ε={_rate(eps)}")


# A guarded step that would raise a task's support loss by more than this fraction is halved.
DESCENT_TOLERANCE = 1e-3
# At most this many halvings (down to 1/1024 of the step); a step that still fails leaves the task where it was.
MAX_HALVINGS = 10


class GuardState(NamedTuple):
    """:func:`descent_guard`'s state: the wrapped rule's, and whether the last step was halved (a bool
    tensor, per task under vmap)."""

    inner: Any
    halved: Tensor


def descent_guard(rule: InnerRule, tolerance: float = DESCENT_TOLERANCE, max_halvings: int = MAX_HALVINGS
                  ) -> InnerRule:
    """``rule`` with the test-time descent safeguard: its update whenever that does not raise the support
    loss (by more than ``tolerance`` of it); otherwise the update halved until it does not (at most
    ``max_halvings`` times, else no step). So the support loss never grows, and on tasks where ``rule``
    descends the result is ``rule`` itself. Needs the ``value_fn`` keyword (the inner loop passes it).

    The decision is made on detached values and enters the update as a constant factor 2^-j: the factor is
    piecewise constant in θ, so it has no derivative, and the gradient through a step is exactly the
    gradient through ``rule``'s step at the rate it took. Branch-free under ``torch.vmap`` (every trial is
    scored); outside a transform the trials stop at the first that descends.
    """

    def init(params: Params) -> GuardState:
        some = next(iter(params.values()))
        return GuardState(rule.init(params), torch.zeros((), dtype=torch.bool, device=some.device))

    def update(grads: Params, state: GuardState, params: Params, *, value_fn: Callable[[Params], Tensor],
               **extra) -> tuple[Updates, GuardState]:
        updates, inner = rule.update(grads, state.inner, params, value_fn=value_fn, **extra)
        factor, first_failed = _halving_factor(value_fn, params, updates, tolerance, max_halvings)
        taken = _each(updates, lambda k, u: torch.where(factor > 0, u * factor, torch.zeros_like(u)))
        return taken, GuardState(inner, first_failed)

    return InnerRule(init=init, update=update,
                     describe=lambda: f"{rule.describe()}, with step halving when the support loss rises")


def _halving_factor(value_fn: Callable[[Params], Tensor], params: Params, updates: Updates, tolerance: float,
                    max_halvings: int) -> tuple[Tensor, Tensor]:
    """``(factor, halved)``: the largest 2^-j (j ≤ max_halvings) whose step does not raise ``value_fn`` beyond
    the tolerance, 0 when none does; ``halved``: the full step did not pass."""
    with torch.no_grad():
        p0 = {k: v.detach() for k, v in params.items()}
        u0 = {k: u if isinstance(u, Assign) else u.detach() for k, u in updates.items()}
        current = value_fn(p0)
        bound = current + tolerance * current.abs()

        def passes(f: Tensor | float) -> Tensor:
            after = value_fn(apply_updates(p0, _each(u0, lambda k, u: u * f)))
            return torch.isfinite(after) & (after <= bound)

        if torch._C._functorch.maybe_current_level() is None:  # outside a transform: stop at the first that passes
            trial = 1.0
            for _ in range(max_halvings + 1):
                if bool(passes(trial)):
                    return torch.full_like(current, trial), torch.tensor(trial < 1.0, device=current.device)
                trial = trial / 2
            return torch.zeros_like(current), torch.tensor(True, device=current.device)
        # Under vmap no Python branch may read a value: every trial is scored. (One batched call over the factors,
        # a nested vmap, breaks mse_loss's batching rule under the exact-ops mode.)
        factor, done, trial = torch.zeros_like(current), torch.zeros_like(current, dtype=torch.bool), 1.0
        first_failed = None
        for _ in range(max_halvings + 1):
            ok = ~done & passes(trial)
            factor = torch.where(ok, torch.full_like(factor, trial), factor)
            first_failed = ~ok if first_failed is None else first_failed
            done = done | ok
            trial = trial / 2
        return factor, first_failed


def was_halved(state: Any) -> Tensor | None:
    """Whether the last step of a :func:`descent_guard` (anywhere in ``state``, a rule's state) was halved;
    ``None`` when no guard is in the rule."""
    if isinstance(state, GuardState):
        return state.halved
    if isinstance(state, tuple):
        for s in state:
            found = was_halved(s)
            if found is not None:
                return found
    return None
