"""The executor: how a learner's tasks run, owned in one object.

An algorithm (through the shared driver, :mod:`mamlkit.algorithms.driver`) hands the executor a per-task
function ``fn(sx, sy, qx, qy) -> (loss, query_pred)``; the executor runs it over a :class:`TaskBatch`.
It holds everything about *how*, and nothing about *what*:

* the strategy (:class:`~mamlkit.exec.strategies.Strategy`: vmap, loop, threads or compile), chunking and
  the checkpointed inner loop, checked here once (:func:`~mamlkit.exec.strategies.choose_strategy`);
* ``auto``'s trial (:mod:`mamlkit.exec.tuning`): on the first batch, the candidates are measured and the
  fastest kept. The trainer calls :meth:`Executor.settle` before its first iteration, knowing the run's
  length; from Python the trial runs by itself on the first ``meta_loss``/``meta_backward`` call (or on
  ``learner.tune(batch)``). Every candidate computes the same numbers, so the trial changes speed only;
* the memory budget (``memory_budget_mb``), met by chunking or refusing candidates in the trial;
* the compiled CPU kernels' switch (``fast_kernels``): the executor installs them, ``functional.call``
  only runs the module view the executor set.

Every per-task run, whatever the strategy (vmap, loop, worker threads, compiled), is wrapped in the modes
of :func:`mamlkit.exec.strategies.task_modes`: the one place where engine-level modes (exact norms under
vmap, the kernels per task) are entered.

Built once, from a :class:`~mamlkit.config.TrainConfig` (:meth:`Executor.from_config`) or from keyword
arguments (``mamlkit.MAML(model, strategy="loop", chunk_size=4)`` forwards them here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.engine import functional
from mamlkit.exec import kernels, strategies, tuning
from mamlkit.exec.kernels import fusion
from mamlkit.exec.strategies import Strategy, TaskFn

log = strategies.log
T = TypeVar("T")


class Executor:
    """Runs per-task functions over task batches for one model.

    Args:
        model: the model the tasks run (its convolutions, dropout and device decide ``auto``'s start and
            which strategies may run it).
        strategy: ``"auto" | "vmap" | "loop" | "threads" | "compile"`` (see :mod:`mamlkit.exec.strategies`).
        chunk_size: tasks per chunk in ``meta_backward``; bounds memory (``None``: the whole batch for vmap).
        checkpoint_inner: recompute each inner step's graph during the meta-gradient instead of keeping it,
            so second-order memory does not grow with the inner steps (loop and threads; same numbers).
        memory_budget_mb: MB of tensors a meta-iteration may hold; ``auto``'s trial chunks vmap or drops
            candidates to fit (0: no limit).
        iterations: how many meta-iterations the run will take, if known: ``auto`` tries a compiled
            meta-gradient only for runs long enough to pay its compile time back.
        fast_kernels: switch the compiled CPU kernels on or off for the process (``None``: leave the
            process's setting, on unless ``MAMLKIT_FAST_KERNELS=0``).
    """

    def __init__(self, model: nn.Module, strategy: str = "auto", *, chunk_size: int | None = None,
                 checkpoint_inner: bool = False, memory_budget_mb: float = 0.0, iterations: int | None = None,
                 fast_kernels: bool | None = None):
        if memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0 (0: no limit), got {memory_budget_mb}")
        device = next(model.parameters()).device
        self.model = model
        self.strategy: Strategy = strategies.choose_strategy(strategy, model, device, chunk_size or None,
                                                             checkpoint_inner=checkpoint_inner)
        self.checkpoint_inner = checkpoint_inner
        self.memory_budget_mb = memory_budget_mb
        self.iterations = iterations
        if fast_kernels is not None:
            kernels.set_enabled(fast_kernels)
        # functional.call runs a Sequential of built-in layers as its fused layer list while a kernels mode is on
        functional.set_module_view(fusion.fused)
        self._settling = False
        # a strategy asked for by name has not yet run this model; auto's trial proves (or drops) its own
        self._proven = self.strategy.auto or self.strategy.name == "loop"

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> Executor:
        """The executor a :class:`~mamlkit.config.TrainConfig` asks for."""
        return cls(model, cfg.strategy, chunk_size=cfg.chunk_size or None, checkpoint_inner=cfg.checkpoint_inner,
                   memory_budget_mb=cfg.memory_budget, iterations=cfg.iterations, fast_kernels=cfg.fast_kernels)

    # --- running tasks -----------------------------------------------------------------------------

    def map_tasks(self, fn: TaskFn, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-task losses ``[T]`` and query predictions ``[T, N_q, ...]``, keeping the autograd graph."""
        return self._first_run(lambda: strategies.map_tasks(fn, batch, self.strategy))

    def backward_tasks(self, fn: TaskFn, batch: TaskBatch, weight: float = 1.0,
                       params: Iterable[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Back-propagate ``weight * mean_t loss_t`` chunk by chunk (see :func:`strategies.backward_tasks`)."""
        return self._first_run(lambda: strategies.backward_tasks(fn, batch, self.strategy, weight, params))

    def meta_backward(self, build: Callable[[dict[str, Tensor]], TaskFn], params: dict[str, nn.Parameter],
                      batch: TaskBatch, weight: float = 1.0) -> tuple[Tensor, Tensor]:
        """Accumulate ``weight ×`` the meta-gradient into ``params[k].grad`` (see :func:`strategies.meta_backward`);
        ``build(params) -> fn`` makes the per-task function, so the compiled strategy can trace it."""
        return self._first_run(lambda: strategies.meta_backward(build, params, batch, self.strategy, weight))

    def _first_run(self, run: Callable[[], T]) -> T:
        """Run ``run``; when a strategy named explicitly (not the loop) raises on its first batch, say which
        strategy failed and which run any model, instead of torch's error alone. The trainer finds this
        in its trial before training (:func:`mamlkit.exec.tuning.settle_strategy`); a Python caller's
        first call is where it shows. Later errors pass unchanged: by then the strategy has run this model."""
        if self._proven or self._settling:
            return run()
        try:
            out = run()
        except UserError:
            raise
        except Exception as err:
            raise tuning.cannot_run(self.strategy.name, err) from err
        self._proven = True
        return out

    # --- choosing the strategy ---------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, strategy: Strategy) -> Iterator[None]:
        """Run the enclosed calls with ``strategy`` (the trial and the memory probe), then restore the own."""
        saved, self.strategy = self.strategy, strategy
        try:
            yield
        finally:
            self.strategy = saved

    @property
    def settled(self) -> bool:
        """Whether the strategy is fixed (an explicit one, or ``auto`` after its trial)."""
        return not self.strategy.auto

    def ready(self, learner: Any, batch: TaskBatch) -> None:
        """Before a learner's meta-loss or meta-gradient: run ``auto``'s trial on ``batch`` if it has not run.
        Not under ``torch.no_grad()``: the trial times meta-gradients, and a call without one (finite
        differences, a validation loss) runs as the strategy starts, with the same numbers."""
        if self.strategy.auto and not self._settling and torch.is_grad_enabled():
            self.settle(learner, batch, say=log.info)

    def settle(self, learner: Any, batch: TaskBatch, *, iterations: int | None = None,
               say: Callable[[str], None] = print) -> Strategy:
        """Fix the strategy for a run of ``iterations`` meta-iterations (default: the executor's) on batches
        like ``batch``: measures memory, fits the budget and, with ``auto``, times the candidates
        (:func:`mamlkit.exec.tuning.settle_strategy`). ``learner`` runs the candidates; its gradients and
        the global RNG are left as they were."""
        self._settling = True
        try:
            runs = iterations if iterations is not None else (self.iterations or 0)
            chosen = tuning.settle_strategy(learner, batch, iterations=runs, memory_budget_mb=self.memory_budget_mb,
                                            say=say)
        finally:
            self._settling = False
        self._proven = True
        return chosen

    def resume(self, name: str | None) -> None:
        """Keep the strategy a checkpointed run measured and used (its recorded name), so a resumed ``auto``
        run computes exactly the same numbers without a new trial. An explicit strategy stays as asked."""
        if self.strategy.auto and name:
            self.strategy = Strategy.from_name(name)
            self._proven = True  # the checkpointed run ran this model with it

    def __repr__(self) -> str:
        return f"Executor({self.strategy.name}{', auto' if self.strategy.auto else ''})"
