"""Exactness is checked, not assumed: what a model's own ops allow, found by running them once.

Two properties of a model decide whether a meta-gradient can be trusted, and neither can be read off its
module types. :func:`probe` finds both by running one task, on an executor's first call of each kind:

* **Ops without a second derivative.** MAML's meta-gradient differentiates the inner gradient again. A
  ``torch.autograd.Function`` whose backward is ``@once_differentiable`` (legacy or ``setup_context``
  style) computes that backward under no_grad and hangs an error node (torch's ``DelayedError``, class
  ``Error``) on detached stand-ins of its results. ``.backward()`` reaches the node and raises, but
  ``torch.autograd.grad(loss, params)`` and the torch.func transforms prune it: the second-order terms
  through the function vanish without an error (14% off for a small tanh net written this way). So the probe walks
  the graph of one task's second-order loss for ``Error`` nodes. Torch's own ops without a double
  backward (``aten::_cdist_backward``, ``aten::_embedding_bag_backward``) raise when reached, and
  :func:`explain` turns that into the same error. Re-entrant checkpointing (``use_reentrant=True``)
  refuses ``torch.autograd.grad`` and the transforms at either order; the probe finds its node in the
  forward graph. Each is a :class:`DifferentiationError` that names the op and the module it runs in.
* **Random ops.** Dropout as a module, as ``F.dropout``, between ``nn.LSTM`` layers or inside attention,
  and ``torch.rand*`` in a forward all reach an aten op tagged ``nondeterministic_seeded``; a dispatch
  mode (:class:`RandomOps`) sees them whatever called them. An inactive dropout (eval mode, ``p = 0``)
  runs none and is nothing to refuse. The ``threads`` strategy cannot give such a model the same
  numbers for the same seed (the draws would follow thread timing), so it refuses them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.engine.exact import exact_ops

FIRST_ORDER = "Train first order instead (first_order=True in Python, --algo fomaml in the CLI)"


class DifferentiationError(UserError, RuntimeError):
    """The model's own ops cannot give the meta-gradient asked for, under any strategy: the message names the
    op and its module, and what works (first order, or a differentiable form of the op)."""


@dataclass(frozen=True)
class Probe:
    """What one task of a model ran: ``random_ops`` (aten op names that draw random numbers) and ``owners``
    (a normalised autograd node name → the module whose forward made it, for naming ops in errors)."""

    random_ops: tuple[str, ...] = ()
    owners: dict[str, str] = field(default_factory=dict)


class RandomOps(TorchDispatchMode):
    """Records the aten ops that draw from a random generator (tag ``nondeterministic_seeded``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and _draws(func, args, kwargs):
            self.seen.add(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


def _draws(func, args: tuple, kwargs: dict) -> bool:
    """Whether a call of a seeded op draws: attention and dropout kernels are tagged for their dropout, which
    with ``p = 0`` (or ``train=False``) draws nothing."""
    schema = func._schema.arguments
    values = {**{a.name: a.default_value for a in schema if a.has_default_value()},
              **dict(zip((a.name for a in schema), args)), **kwargs}
    if any(isinstance(values.get(k), (int, float)) and values[k] == 0 for k in ("p", "dropout_p")):
        return False
    return values.get("train", True) is not False


def _nodes(start) -> Iterator:
    """Every autograd node reachable from ``start`` (a node or None)."""
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(f for f, _ in node.next_functions)


def _tensors(out) -> Iterator[Tensor]:
    """The tensors in a module's output: a tensor, or any nesting of tuples, lists and dicts of them."""
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _tensors(v)


def _key(name: str) -> str:
    """``CdistBackward0`` and ``_cdist_backward`` both → ``cdist``: how a node and its op's backward are matched."""
    name = re.sub(r"Backward\d*$", "", name)
    return re.sub(r"_?backward$", "", name).replace("_", "").lower()


_ONCE = torch.autograd.function.once_differentiable(lambda ctx, *g: g).__code__


def _once_differentiable(node) -> bool:
    """Whether ``node`` is a custom ``torch.autograd.Function`` whose backward is ``@once_differentiable``."""
    cls = getattr(node, "_forward_cls", None)
    return cls is not None and getattr(getattr(cls, "backward", None), "__code__", None) is _ONCE


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node made on this thread gets (numbers grow as nodes are made)."""
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


@contextlib.contextmanager
def _owning(model: nn.Module, owners: dict) -> Iterator[None]:
    """While it is open, each autograd node a module's forward makes is recorded in ``owners`` with the
    module's name: the innermost module whose forward made it (inner modules finish first and claim their
    nodes; a node older than the forward's start was made before it). Each forward walks only the nodes it
    made, so the cost is the graph's size times the modules' nesting depth."""
    names = {id(m): f"module '{name}' ({type(m).__name__})" if name else type(m).__name__
             for name, m in model.named_modules()}
    starts: list[int] = []

    def before(module, args):
        starts.append(_next_sequence_nr())

    def after(module, args, output):
        start = starts.pop() if starts else 0
        name = names.get(id(module))
        if name is None:
            return
        stack, seen = [t.grad_fn for t in _tensors(output)], set()
        while stack:  # down to the nodes made before this forward began: their inputs are older still
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ != "AccumulateGrad" and node._sequence_nr() >= start:
                owners.setdefault(node, name)  # an inner module's nodes stay its own
                stack.extend(f for f, _ in node.next_functions)

    handles = (nn.modules.module.register_module_forward_pre_hook(before),
               nn.modules.module.register_module_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def probe(model: nn.Module, fn: Callable, batch: TaskBatch, second_order: bool) -> Probe:
    """Run task 0 of ``batch`` once per task (no strategy): the model's forward on its support inputs under
    :class:`RandomOps`, and with ``second_order`` the per-task function ``fn``, whose loss graph is searched
    for error nodes. Raises :class:`DifferentiationError` for an op that cannot give the meta-gradient.
    Leaves the global RNG, the model's buffers and every ``.grad`` as they were. A model the plain forward
    cannot run (a per-task function that is not the model on ``support_x``) is left to the strategy."""
    # outside the caller's dispatch modes: the memory probe (mamlkit.exec.memory) measures the strategy, not this
    with _disable_current_modes():
        return _probe(model, fn, batch, second_order)


def _probe(model: nn.Module, fn: Callable, batch: TaskBatch, second_order: bool) -> Probe:
    owners: dict = {}
    params = dict(model.named_parameters())
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    mode = RandomOps()
    devices = [] if batch.support_x.device.type == "cpu" else [batch.support_x.device]
    with torch.random.fork_rng(devices=devices):
        try:
            with _owning(model, owners), mode, torch.enable_grad():
                out = torch.func.functional_call(model, (params, buffers), (batch.support_x[0],), strict=False)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - the strategy's own run reports what a plain forward cannot do
            return Probe()
        names = {_key(type(n).__name__): owner for n, owner in owners.items()}
        for t in _tensors(out):
            for node in _nodes(t.grad_fn):
                if type(node).__name__ == "CheckpointFunctionBackward":
                    raise DifferentiationError(_reentrant(owners.get(node, type(model).__name__)))
        found = Probe(tuple(sorted(mode.seen)), names)
        if second_order:
            _search_second_order(model, fn, batch, found)
    return found


def _search_second_order(model: nn.Module, fn: Callable, batch: TaskBatch, found: Probe) -> None:
    """Run ``fn`` on task 0 (as the loop does, with torch.autograd's double backward) and raise if its loss
    graph holds an error node: a term of the meta-gradient that would be dropped or raise."""
    args = (batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0])
    owners = {}  # the task's own forward runs make new nodes
    try:
        with _owning(model, owners), exact_ops(vectorized=False, second_order=True), torch.enable_grad():
            loss = fn(*args)[0]
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        why = explain(err, found)
        if why is not None:
            raise why from err
        return  # the strategy's own run says what went wrong
    nodes = list(_nodes(loss.grad_fn))
    if not any(type(n).__name__ == "Error" for n in nodes):
        return
    once = sorted({f"{n._forward_cls.__name__} (in {owners.get(n, type(model).__name__)})"
                   for n in nodes if _once_differentiable(n)})
    what = (", ".join(once) + ": a torch.autograd.Function whose backward is @once_differentiable" if once else
            "an op whose backward is not differentiable (an @once_differentiable torch.autograd.Function)")
    raise DifferentiationError(f"the second-order meta-gradient cannot be exact for this model: {what} has no "
                               "second derivative, so the terms through it would be lost without an error. "
                               f"{FIRST_ORDER}, or give the function a "
                               "backward made of differentiable torch ops")


def _reentrant(module: str) -> str:
    return (f"torch.utils.checkpoint with use_reentrant=True (in {module}) cannot be differentiated by "
            "torch.autograd.grad or the torch.func transforms, which the inner loop needs at either order. Pass "
            "use_reentrant=False (Hugging Face: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False})): that form is exact at both orders under the loop and threads strategies")


_NOT_IMPLEMENTED = re.compile(r"derivative for '(?:aten::)?([\w.]+)' is not implemented")


def explain(err: BaseException, found: Probe | None = None) -> DifferentiationError | None:
    """The :class:`DifferentiationError` that ``err`` (raised by torch while a strategy ran) stands for, or
    None when it is about something else. ``found``: the model's probe, to name the module of an op."""
    text = str(err)
    match = _NOT_IMPLEMENTED.search(text)
    if match and match.group(1).endswith("backward"):
        op = match.group(1)
        module = (found.owners.get(_key(op)) if found else None) or "the model"
        return DifferentiationError(
            f"the second-order meta-gradient cannot be computed for this model: torch has no derivative for "
            f"aten::{op}, the backward of the {op.strip('_').removesuffix('_backward')} op in {module}. "
            f"{FIRST_ORDER}, or replace the op by differentiable torch ops")
    if "differentiate twice a function that was marked with @once_differentiable" in text:
        return DifferentiationError("the second-order meta-gradient cannot be exact for this model: a "
                                    "torch.autograd.Function in it has an @once_differentiable backward. "
                                    f"{FIRST_ORDER}")
    if "use_reentrant=True" in text and "checkpoint" in text:
        return DifferentiationError(_reentrant("the model"))
    return None


def threads_refusal(ops: tuple[str, ...]) -> str:
    """Why the ``threads`` strategy refuses a model that draws random numbers."""
    return (f"strategy threads cannot run this model reproducibly: its forward draws random numbers (aten::"
            f"{', aten::'.join(ops)}), and on threads the draws would follow thread timing. Use strategy loop, vmap "
            "or auto (the same seed gives the same meta-gradient), or put the model in eval mode if its dropout "
            "should be off")


def training_key(model: nn.Module) -> int:
    """A key of the model's train/eval flags: what a module runs (dropout, say) may change with them."""
    return hash(tuple(m.training for m in model.modules()))


__all__ = ["DifferentiationError", "Probe", "RandomOps", "explain", "probe", "threads_refusal", "training_key"]
