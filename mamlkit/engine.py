"""Execution strategies: run one per-task function over a :class:`TaskBatch`.

Every algorithm writes a single per-task function ``fn(sx, sy, qx, qy) -> (loss, query_pred)``.
This module runs it over the tasks of a batch in one of two ways, which give the same
numbers (a test checks this to 1e-10 in float64):

* ``vmap``: ``torch.vmap`` over tasks, under :class:`~mamlkit.functional.ExactNorms` so that
  normalisation layers stay exact at second order. Fastest for small models (the sinusoid
  MLP runs ~10× a Python loop on 2 CPU cores), where time goes to dispatch overhead.
* ``loop``: a Python loop over tasks calling the same function. Often fastest for
  convolutional nets on the CPU with many query images, where vmap's batched (grouped)
  convolutions are slower, and the fallback for operations vmap cannot batch.
* ``compile``: the whole meta-gradient as one function, ``torch.func.grad`` of the vmapped
  meta-loss, compiled by ``torch.compile``, so no double backward is left to the eager
  autograd engine at run time. ~6× vmap on the sinusoid MLP on the CPU (dispatch-bound), at a
  one-off compile cost of tens of seconds; not a win for Conv nets on the CPU.
* ``auto``: measured, not guessed (:func:`autotune`): the candidates run the first batch of
  training and the fastest is kept. Every candidate is exact.

Either can be chunked: ``chunk_size`` tasks are run, their loss back-propagated and their
graph freed before the next chunk, so peak memory scales with the chunk, not the meta-batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mamlkit.functional import ExactNorms
from mamlkit.tasks.base import TaskBatch

log = logging.getLogger("mamlkit")

TaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
STRATEGIES = ("auto", "vmap", "loop", "compile")


@dataclass(frozen=True)
class Strategy:
    """How tasks are batched: ``vectorize`` (vmap) or not (loop), ``chunk_size`` tasks at a time
    (``None``: the whole meta-batch at once for vmap, one task at a time for backward in a loop).
    ``compiled``: the meta-gradient runs as one ``torch.compile``-d function (implies vmap).
    ``auto``: chosen by :func:`autotune` on the first training batch (until then it runs as given)."""

    vectorize: bool
    chunk_size: int | None = None
    compiled: bool = False
    auto: bool = False
    auto_chunk: bool = field(default=False, compare=False)  # tuning: also try it in chunks (mamlkit.tuning)
    # compiled meta-gradient functions, one per per-task builder (kept across iterations)
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        base = "compile" if self.compiled else "vmap" if self.vectorize else "loop"
        return base + (f"(chunk={self.chunk_size})" if self.chunk_size else "")

    @classmethod
    def from_name(cls, name: str) -> Strategy:
        """The inverse of :attr:`name`: ``"vmap"``, ``"loop"``, ``"compile"``, optionally ``"(chunk=N)"``."""
        base, _, rest = name.partition("(chunk=")
        if base not in STRATEGIES[1:]:
            raise ValueError(f"unknown strategy name {name!r}")
        return cls(vectorize=base != "loop", chunk_size=int(rest.rstrip(")")) if rest else None,
                   compiled=base == "compile")

    def replace(self, **kw) -> Strategy:
        return dataclasses.replace(self, **kw, cache={})


def choose_strategy(requested: str, model: nn.Module, device: torch.device | str = "cpu",
                    chunk_size: int | None = None, *, checkpoint_inner: bool = False) -> Strategy:
    """Resolve ``"auto" | "vmap" | "loop" | "compile"`` to a :class:`Strategy`.

    ``auto`` starts as vmap (the loop for convolutional models on the CPU, or with
    ``checkpoint_inner``) and is settled by :func:`autotune` on the first training batch.
    Every strategy is exact. A checkpointed inner loop (``checkpoint_inner``) runs only in the loop.
    """
    if requested not in STRATEGIES:
        raise ValueError(f"unknown strategy {requested!r}; choose one of {', '.join(STRATEGIES)}")
    if checkpoint_inner and requested in ("vmap", "compile"):
        raise ValueError(f"checkpoint_inner runs only with strategy loop or auto, not {requested}: "
                         "torch.func transforms cannot recompute a checkpointed step")
    chunk = chunk_size or None
    if requested == "auto":
        loop = checkpoint_inner or (_has_conv(model) and torch.device(device).type == "cpu")
        return Strategy(vectorize=not loop, chunk_size=chunk, auto=not checkpoint_inner)
    return Strategy(vectorize=requested != "loop", chunk_size=chunk, compiled=requested == "compile")


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _run(fn: TaskFn, batch: TaskBatch, vectorize: bool) -> tuple[Tensor, Tensor]:
    args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    if vectorize:
        # randomness="different": a model with dropout gets independent masks per task, as in the loop.
        with ExactNorms():
            return torch.vmap(fn, randomness="different")(*args)
    outs = [fn(*(a[i] for a in args)) for i in range(batch.num_tasks)]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def chunks(batch: TaskBatch, strategy: Strategy, for_backward: bool = False) -> Iterator[TaskBatch]:
    """Split ``batch`` into the chunks the strategy runs together."""
    size = strategy.chunk_size
    if size is None:
        size = 1 if (for_backward and not strategy.vectorize) else batch.num_tasks
    for start in range(0, batch.num_tasks, size):
        yield batch[start:start + size]


def map_tasks(fn: TaskFn, batch: TaskBatch, strategy: Strategy) -> tuple[Tensor, Tensor]:
    """Per-task losses ``[T]`` and query predictions ``[T, N_q, ...]``, keeping the autograd graph."""
    outs = [_run(fn, c, strategy.vectorize) for c in chunks(batch, strategy)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def backward_tasks(fn: TaskFn, batch: TaskBatch, strategy: Strategy, weight: float = 1.0
                   ) -> tuple[Tensor, Tensor]:
    """Back-propagate ``weight * mean_t loss_t`` chunk by chunk, freeing each chunk's graph.

    Gradients accumulate into ``.grad`` exactly as ``(weight * losses.mean()).backward()`` would.
    Returns the detached per-task losses ``[T]`` and query predictions.
    """
    losses, preds = [], []
    for c in chunks(batch, strategy, for_backward=True):
        loss, pred = _run(fn, c, strategy.vectorize)
        (loss.sum() * (weight / batch.num_tasks)).backward()
        losses.append(loss.detach())
        preds.append(pred.detach())
    return torch.cat(losses), torch.cat(preds)


def meta_backward(build: Callable[[dict[str, Tensor]], TaskFn], params: dict[str, nn.Parameter], batch: TaskBatch,
                  strategy: Strategy, weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """Accumulate ``weight ×`` the meta-gradient of the mean task loss into ``params[k].grad``.

    ``build(params) -> fn`` makes the per-task function for a given meta-parameter dict; the eager
    strategies call it once with ``params`` (autograd records the graph), the compiled strategy
    differentiates it with ``torch.func.grad`` inside ``torch.compile``. ``build`` should be the same
    object on every call, so the compiled function is reused. Returns detached per-task losses ``[T]``
    and query predictions ``[T, N_q, ...]``.
    """
    if not strategy.compiled:
        return backward_tasks(build(params), batch, strategy, weight)
    grad_fn = strategy.cache.get(build)
    if grad_fn is None:
        grad_fn = strategy.cache[build] = _compiled_grad(build)
    losses, preds = [], []
    detached = {k: p.detach() for k, p in params.items()}
    for c in chunks(batch, strategy):
        grads, (loss, pred) = grad_fn(detached, c.support_x, c.support_y, c.query_x, c.query_y)
        scale = weight * c.num_tasks / batch.num_tasks  # grad_fn differentiates the chunk's mean
        for k, p in params.items():
            g = grads[k] if scale == 1.0 else grads[k] * scale
            p.grad = g if p.grad is None else p.grad + g
        losses.append(loss)
        preds.append(pred)
    return torch.cat(losses), torch.cat(preds)


def _compiled_grad(build: Callable[[dict[str, Tensor]], TaskFn]) -> Callable:
    def meta(params, sx, sy, qx, qy):
        with ExactNorms():  # exact second-order normalisation, as in eager vmap
            losses, preds = torch.vmap(build(params), randomness="different")(sx, sy, qx, qy)
        return losses.mean(), (losses.detach(), preds.detach())

    # dynamic=False: a training run has fixed shapes; a new shape (a last, smaller chunk) recompiles once.
    return torch.compile(torch.func.grad(meta, has_aux=True), dynamic=False)


def task_metrics(losses: Tensor, preds: Tensor, query_y: Tensor, kind: str) -> dict[str, float]:
    """Mean query loss, and accuracy for classification (predictions are logits)."""
    out = {"loss": losses.detach().mean().item()}
    if kind == "classification":
        out["acc"] = (preds.argmax(-1) == query_y).float().mean().item()
    return out
