"""Execution strategies: run one per-task function over a :class:`TaskBatch`.

Every algorithm writes a single per-task function ``fn(sx, sy, qx, qy) -> (loss, query_pred)``.
This module runs it over the tasks of a batch in one of two ways, which give the same
numbers (a test checks this to 1e-10 in float64):

* ``vmap``: ``torch.vmap`` over tasks, under :func:`~mamlkit.engine.exact.exact_ops` so that
  normalisation, recurrent layers and attention stay exact at second order. Fastest for small models (the sinusoid
  MLP runs ~10× a Python loop on 2 CPU cores), where time goes to dispatch overhead.
* ``loop``: a Python loop over tasks calling the same function. Often fastest for
  convolutional nets on the CPU with many query images, where vmap's batched (grouped)
  convolutions are slower, and the fallback for operations vmap cannot batch.
* ``threads``: the loop, with tasks spread over worker threads that each run one intra-op thread.
  On a CPU, one task of a small conv net is too little work to keep several cores busy inside each
  kernel; whole tasks in parallel do (1.65× the loop on 2 cores for Omniglot 5w1s, benchmarks/
  RESULTS.md). Per-task gradients are summed in task order, so the result is deterministic and
  equals the loop's.
* ``compile``: the whole meta-gradient as one function, ``torch.func.grad`` of the vmapped
  meta-loss, compiled by ``torch.compile``, so no double backward is left to the eager
  autograd engine at run time. ~6× vmap on the sinusoid MLP on the CPU (dispatch-bound), at a
  one-off compile cost of tens of seconds; not a win for Conv nets on the CPU.
* The loop and threads strategies run NCHW max-pooling and batch norm through :mod:`mamlkit.exec.kernels`
  (compiled kernels; every differentiated backward is torch's; same numbers to rounding), entered per
  thread, and a batch norm → ReLU → max-pool block as one fused kernel (:mod:`mamlkit.exec.kernels.fusion`).
* Every strategy enters :func:`~mamlkit.engine.exact.exact_ops` around its per-task runs: attention runs
  its math kernel wherever the graph is differentiated twice (the fused kernels have no double backward).
* ``auto``: measured, not guessed (:mod:`mamlkit.exec.tuning`): the candidates run the first batch of
  training, those whose meta-gradient matches the loop's are timed, and the fastest is kept.

Either can be chunked: ``chunk_size`` tasks are run, their loss back-propagated and their
graph freed before the next chunk, so peak memory scales with the chunk, not the meta-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from mamlkit.base.batch import TaskBatch
from mamlkit.base.choices import STRATEGIES, check_choice
from mamlkit.engine import functional
from mamlkit.engine.exact import ExactOps, exact_ops, math_attention
from mamlkit.exec import kernels, threads

log = logging.getLogger("mamlkit")

TaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Strategy:
    """How tasks are batched: ``vectorize`` (vmap) or not (loop), ``chunk_size`` tasks at a time
    (``None``: the whole meta-batch at once for vmap, one task at a time for backward in a loop).
    ``compiled``: the meta-gradient runs as one ``torch.compile``-d function (implies vmap).
    ``workers``: run the loop's tasks on this many threads (0 or 1: the plain loop; -1: as many as
    :func:`mamlkit.exec.threads.task_workers` when it runs).
    ``auto``: chosen by :func:`mamlkit.exec.tuning.settle_strategy` on the first training batch (until then it
    runs as given)."""

    vectorize: bool
    chunk_size: int | None = None
    compiled: bool = False
    workers: int = 0
    auto: bool = False
    auto_chunk: bool = field(default=False, compare=False)  # tuning: also try it in chunks (mamlkit.exec.tuning)
    # compiled meta-gradient functions, one per per-task builder (kept across iterations)
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        if self.threaded:
            return "threads" + (f"(workers={self.workers})" if self.workers > 0 else "")
        base = "compile" if self.compiled else "vmap" if self.vectorize else "loop"
        return base + (f"(chunk={self.chunk_size})" if self.chunk_size else "")

    @property
    def threaded(self) -> bool:
        return not self.vectorize and (self.workers > 1 or self.workers == -1)

    def num_workers(self) -> int:
        return threads.task_workers() if self.workers == -1 else max(self.workers, 1)

    @classmethod
    def from_name(cls, name: str) -> Strategy:
        """The inverse of :attr:`name`: ``"vmap"``, ``"loop"``, ``"compile"``, optionally ``"(chunk=N)"``,
        and ``"threads"``, optionally ``"(workers=N)"``."""
        if name.startswith("threads"):
            rest = name[len("threads"):]
            if rest and not (rest.startswith("(workers=") and rest.endswith(")")):
                raise ValueError(f"unknown strategy name {name!r}")
            return cls(vectorize=False, workers=int(rest[len("(workers="):-1]) if rest else -1)
        base, _, rest = name.partition("(chunk=")
        if base not in STRATEGIES[1:]:
            raise ValueError(f"unknown strategy name {name!r}")
        return cls(vectorize=base != "loop", chunk_size=int(rest.rstrip(")")) if rest else None,
                   compiled=base == "compile")

    def replace(self, **kw) -> Strategy:
        return dataclasses.replace(self, **kw, cache={})


@dataclass(frozen=True)
class Work:
    """What a learner hands the executor for a meta-gradient, all the executor (and ``auto``'s trial) needs:
    ``build(params) -> fn``, the per-task function for given meta-parameters (for an algorithm with an outer
    direction of its own, Reptile's θ − φ or iMAML's implicit gradient, the builder of that one), the
    meta-parameters ``params`` whose ``.grad`` receives it, and whether ``build`` traces under
    ``torch.compile`` (``compilable``). ``build`` should be the same object on every call: the compiled
    strategy keeps one compiled function per builder."""

    build: Callable[[dict[str, Tensor]], TaskFn]
    params: dict[str, nn.Parameter]
    compilable: bool = False


def choose_strategy(requested: str, model: nn.Module, device: torch.device | str = "cpu",
                    chunk_size: int | None = None, *, checkpoint_inner: bool = False) -> Strategy:
    """Resolve ``"auto" | "vmap" | "loop" | "threads" | "compile"`` to a :class:`Strategy`.

    ``auto`` starts as vmap (the loop for convolutional models on the CPU, or with
    ``checkpoint_inner``) and is settled by :func:`mamlkit.exec.tuning.settle_strategy` on the first training
    batch.
    Every strategy is exact. A checkpointed inner loop (``checkpoint_inner``) runs only in the loop.
    """
    check_choice("strategy", requested, STRATEGIES)
    if checkpoint_inner and requested in ("vmap", "compile"):
        raise ValueError(f"checkpoint_inner runs only with strategy loop, threads or auto, not {requested}: "
                         "torch.func transforms cannot recompute a checkpointed step")
    chunk = chunk_size or None
    if requested == "auto":
        loop = checkpoint_inner or (_has_conv(model) and torch.device(device).type == "cpu")
        return Strategy(vectorize=not loop, chunk_size=chunk, auto=not checkpoint_inner)
    if requested == "threads":  # refused on its first run if the model draws random numbers (Executor.check)
        return Strategy(vectorize=False, workers=-1)
    return Strategy(vectorize=requested != "loop", chunk_size=chunk, compiled=requested == "compile")


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def math_attention_in_backward(out: Tensor) -> None:
    """Run a later backward pass through ``out`` (the caller's ``loss.backward()``) with attention on its math
    kernel: switched on when the pass reaches ``out``'s node, off when the pass ends. An activation checkpoint
    recomputes its segment in that pass and must pick the kernel its forward picked, or torch raises a
    ``CheckpointError`` (the fused kernel saves other tensors)."""
    if out.grad_fn is None:
        return

    def switch_on(grad_outputs):
        switch = math_attention()
        switch.__enter__()
        torch.autograd.Variable._execution_engine.queue_callback(lambda: switch.__exit__(None, None, None))

    out.grad_fn.register_prehook(switch_on)


def task_modes(vectorized: bool, kernel_key: Hashable = None, second_order: bool = True
               ) -> contextlib.AbstractContextManager:
    """The modes every eager per-task run is wrapped in, whatever the strategy: the one place where the
    executor enters them. :func:`~mamlkit.engine.exact.exact_ops` always (under vmap: norms and recurrent
    layers as primitive ops, attention on its math kernel; per task: the math kernel where the graph is
    differentiated twice); per task (loop, threads) also the compiled CPU kernels
    (:func:`mamlkit.exec.kernels.fast`), keyed by the per-task code and shapes. The compiled strategy enters
    :class:`~mamlkit.engine.exact.ExactOps` inside its trace."""
    if vectorized:
        return exact_ops(vectorized=True)
    return _per_task_modes(kernel_key, second_order)


@contextlib.contextmanager
def _per_task_modes(kernel_key: Hashable, second_order: bool) -> Iterator[None]:
    with exact_ops(vectorized=False, second_order=second_order), kernels.fast(kernel_key):
        yield


def _run(fn: TaskFn, batch: TaskBatch, vectorize: bool) -> tuple[Tensor, Tensor]:
    args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    if vectorize:
        # randomness="different": a model with dropout gets independent masks per task, as in the loop.
        with task_modes(True):
            return torch.vmap(fn, randomness="different")(*args)
    with task_modes(False, _kernel_key(fn, batch), _second_order(fn)):
        outs = [fn(*(a[i] for a in args)) for i in range(batch.num_tasks)]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def _second_order(fn: Callable) -> bool:
    """Whether ``fn``'s graph is differentiated twice (set by ``make_task_fn``; assumed when unknown)."""
    return getattr(fn, "second_order", True)


def _kernel_key(fn: Callable, batch: TaskBatch) -> tuple:
    """What decides whether :mod:`mamlkit.exec.kernels` pays: the per-task code and the shapes it runs on."""
    return (getattr(fn, "__code__", None) or fn, batch.support_x.dtype, tuple(batch.support_x.shape[1:]),
            tuple(batch.query_x.shape[1:]))


def chunks(batch: TaskBatch, strategy: Strategy, for_backward: bool = False) -> Iterator[TaskBatch]:
    """Split ``batch`` into the chunks the strategy runs together."""
    size = strategy.chunk_size
    if size is None:
        size = 1 if (for_backward and not strategy.vectorize) else batch.num_tasks
    if size >= batch.num_tasks:  # one chunk: the batch itself (a slice of every field is a new TaskBatch, checked)
        yield batch
        return
    for start in range(0, batch.num_tasks, size):
        yield batch[start:start + size]


def map_tasks(fn: TaskFn, batch: TaskBatch, strategy: Strategy) -> tuple[Tensor, Tensor]:
    """Per-task losses ``[T]`` and query predictions ``[T, N_q, ...]``, keeping the autograd graph."""
    if strategy.threaded:
        outs = threaded_tasks(fn, batch, strategy.num_workers())
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    outs = [_run(fn, c, strategy.vectorize) for c in chunks(batch, strategy)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def map_args(fn: Callable[..., Any], args: tuple, *, vectorize: bool, shared: tuple = ()) -> Any:
    """``fn(*shared, *slice)`` on each task's slice of ``args`` (tensors, or dicts and tuples of them, with a
    leading task dimension), its outputs (likewise) stacked over tasks: evaluation's per-task work, which builds
    no meta-gradient. ``shared``: arguments every task gets whole (``in_dims=None`` under vmap). ``vectorize``:
    ``torch.vmap`` under the modes of :func:`task_modes` (random draws independent per task, as :func:`_run`'s);
    otherwise a loop over tasks. The loop runs no compiled kernel: ``fn`` may differentiate with
    ``torch.func.grad``, which their autograd functions do not support, and evaluation differentiates once, so
    the fused kernels gain little."""
    num_tasks = pytree.tree_leaves(args)[0].shape[0]
    if vectorize:
        with task_modes(True):
            in_dims = (None,) * len(shared) + (0,) * len(args)
            return torch.vmap(fn, in_dims=in_dims, randomness="different")(*shared, *args)
    with exact_ops(vectorized=False, second_order=False):
        outs = [fn(*shared, *pytree.tree_map(lambda t, i=i: t[i], args)) for i in range(num_tasks)]
    return pytree.tree_map(lambda *per_task: torch.stack(per_task), *outs)


def backward_tasks(fn: TaskFn, batch: TaskBatch, strategy: Strategy, weight: float = 1.0,
                   params: Iterable[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Back-propagate ``weight * mean_t loss_t`` chunk by chunk, freeing each chunk's graph.

    Gradients accumulate into ``.grad`` exactly as ``(weight * losses.mean()).backward()`` would.
    Returns the detached per-task losses ``[T]`` and query predictions. The threads strategy
    differentiates with respect to ``params`` (the meta-parameters); without them it runs the loop.
    """
    if strategy.threaded and params is not None:
        return _threaded_backward(fn, batch, strategy.num_workers(), weight, list(params))
    losses, preds = [], []
    for c in chunks(batch, strategy, for_backward=True):
        loss, pred = _run(fn, c, strategy.vectorize)
        # per task, the backward runs under the forward's attention switch: an activation checkpoint recomputes
        # its segment there, and must pick the same (math) kernel as the forward did
        with contextlib.nullcontext() if strategy.vectorize else exact_ops(vectorized=False,
                                                                           second_order=_second_order(fn)):
            (loss.sum() * (weight / batch.num_tasks)).backward()
        losses.append(loss.detach())
        preds.append(pred.detach())
    return torch.cat(losses), torch.cat(preds)


def backward_over_tasks(build: Callable[[dict[str, Tensor]], TaskFn], params: dict[str, nn.Parameter],
                       batch: TaskBatch, strategy: Strategy, weight: float = 1.0, fn: TaskFn | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Accumulate ``weight ×`` the meta-gradient of the mean task loss into ``params[k].grad``.

    ``build(params) -> fn`` makes the per-task function for a given meta-parameter dict; the eager
    strategies call it once with ``params`` (autograd records the graph), the compiled strategy
    differentiates it with ``torch.func.grad`` inside ``torch.compile``. ``build`` should be the same
    object on every call, so the compiled function is reused. Returns detached per-task losses ``[T]``
    and query predictions ``[T, N_q, ...]``. ``fn``: ``build(params)``, where the caller has made it already.
    """
    if not strategy.compiled:
        return backward_tasks(fn or build(params), batch, strategy, weight, params.values())
    grad_fn = strategy.cache.get(build)
    if grad_fn is None:
        grad_fn = strategy.cache[build] = _compiled_grad(build)
    losses, preds = [], []
    detached = {k: p.detach() for k, p in params.items()}
    for c in chunks(batch, strategy):
        with math_attention():  # attention's math kernel, also for the trace (outside it: no graph break)
            grads, (loss, pred) = grad_fn(detached, c.support_x, c.support_y, c.query_x, c.query_y)
        scale = weight * c.num_tasks / batch.num_tasks  # grad_fn differentiates the chunk's mean
        for k, p in params.items():
            if not p.requires_grad:  # frozen: no meta-gradient, as in the eager strategies
                continue
            g = grads[k] if scale == 1.0 else grads[k] * scale
            p.grad = g if p.grad is None else p.grad + g
        losses.append(loss)
        preds.append(pred)
    return torch.cat(losses), torch.cat(preds)


# --- threads: whole tasks on worker threads ---------------------------------------------------------

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A lasting pool of ``workers`` threads, each with one intra-op thread (the tasks are the parallelism)."""
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="mamlkit-task",
                                                 initializer=torch.set_num_threads, initargs=(1,))
        return _POOLS[workers]


def _in_worker(job: Callable, grad_enabled: bool, kernel_key: tuple) -> Callable:
    """``job`` as a worker runs it: grad mode is thread-local, so the caller's is carried over, and
    ``functional.call`` uses a per-thread replica of each module (``functional_call`` swaps a module's
    tensors while it runs, so two threads must not share one module)."""
    def run(*args):
        # exact_ops' attention switch is process-wide: the caller enters it for its workers (_map_threaded)
        with torch.set_grad_enabled(grad_enabled), functional.thread_replicas(), kernels.fast(kernel_key):
            return job(*args)
    return run


@contextlib.contextmanager
def _single_threaded_caller() -> Iterator[None]:
    """The caller drops to one intra-op thread while the workers run. A thread count is per thread for
    OpenMP but not for every library torch calls (MKL's is process-wide): with the caller at 2, two
    workers on 2 cores ran 0.6× as fast as with it at 1 (measured, benchmarks/RESULTS.md)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _map_threaded(task: Callable, batch: TaskBatch, workers: int, grad_enabled: bool, kernel_key: tuple
                  ) -> Iterator:
    """``task(sx, sy, qx, qy)`` on every task of ``batch`` on ``workers`` threads, yielded in task order
    (so that whatever the threads' timing, results are combined in the loop's order). ``kernel_key``:
    the per-task code and shapes, for :func:`mamlkit.exec.kernels.fast`."""
    job = _in_worker(lambda t: task(t.support_x[0], t.support_y[0], t.query_x[0], t.query_y[0]), grad_enabled,
                     kernel_key)
    # the attention kernel switch is process-wide, so the caller sets it for its workers
    with _single_threaded_caller(), exact_ops(vectorized=False, second_order=_second_order(task)):
        yield from _pool(workers).map(job, [batch[i:i + 1] for i in range(batch.num_tasks)])


def threaded_tasks(fn: TaskFn, batch: TaskBatch, workers: int) -> list[tuple[Tensor, Tensor]]:
    """``fn`` on every task of ``batch``, on ``workers`` threads; results in task order."""
    return list(_map_threaded(fn, batch, workers, torch.is_grad_enabled(), _kernel_key(fn, batch)))


def _threaded_backward(fn: TaskFn, batch: TaskBatch, workers: int, weight: float, params: list[Tensor]
                       ) -> tuple[Tensor, Tensor]:
    scale = weight / batch.num_tasks
    wanted = [p for p in params if p.requires_grad]

    def task(*data: Tensor):
        loss, pred = fn(*data)
        return torch.autograd.grad(loss * scale, wanted, allow_unused=True), loss.detach(), pred.detach()

    task.second_order = _second_order(fn)

    losses, preds = [], []
    for grads, loss, pred in _map_threaded(task, batch, workers, True, _kernel_key(fn, batch)):
        for p, g in zip(wanted, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        losses.append(loss)
        preds.append(pred)
    return torch.stack(losses), torch.stack(preds)


def _compiled_grad(build: Callable[[dict[str, Tensor]], TaskFn]) -> Callable:
    def meta(params, sx, sy, qx, qy):
        with ExactOps():  # exact second-order norms and recurrent layers, as in eager vmap
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
