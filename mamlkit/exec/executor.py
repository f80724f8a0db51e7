"""The executor: how a learner's tasks run, owned in one object.

An algorithm (through the shared driver, :mod:`mamlkit.algorithms.driver`) hands the executor a per-task
function ``fn(sx, sy, qx, qy) -> (loss, query_pred)``; the executor runs it over a :class:`TaskBatch`.
It holds everything about *how*, and nothing about *what*:

* the strategy (:class:`~mamlkit.exec.strategies.Strategy`: vmap, loop, threads or compile), chunking and
  the checkpointed inner loop, checked here once (:func:`~mamlkit.exec.strategies.choose_strategy`);
* ``auto``'s trial (:mod:`mamlkit.exec.tuning`): on the first batch, the candidates are measured and the
  fastest kept. A learner hands the executor a :class:`~mamlkit.exec.strategies.Work` (its per-task builder
  and meta-parameters), and the trial times the executor's own backward of it under each candidate: the
  executor never calls back into the learner. The trainer settles before its first iteration, knowing the
  run's length; from Python the trial runs by itself on the first ``meta_loss``/``meta_backward`` call (or
  on ``learner.tune(batch)``). Every candidate must match the loop's meta-gradient on the trial batch (checked),
  so the trial changes speed only;
* what the model runs (:meth:`Executor.check`, :mod:`mamlkit.exec.exactness`), found on the first call: an
  op without the derivatives the meta-gradient needs is one error under every strategy, and ``threads``
  refuses a model that draws random numbers;
* the memory budget (``memory_budget_mb``), met by chunking or refusing candidates in the trial;
* the compiled CPU kernels' switch (``fast_kernels``): the executor installs them, ``functional.call``
  only runs the module view the executor set;
* the thread plan (``threads``, :mod:`mamlkit.exec.threads`): every call runs under it and gives the
  caller's thread settings back when it returns (:meth:`Executor.planned`);
* evaluation and adaptation (:meth:`Executor.map`, :meth:`Executor.evaluate_tasks`): the same strategy,
  or the loop where vmap cannot run the model, so a model that trains also evaluates.

Every per-task run, whatever the strategy (vmap, loop, worker threads, compiled), is wrapped in the modes
of :func:`mamlkit.exec.strategies.task_modes`: the one place where engine-level modes (exact norms under
vmap, the kernels per task) are entered.

Built once, from a :class:`~mamlkit.config.TrainConfig` (:meth:`Executor.from_config`) or from keyword
arguments (``mamlkit.MAML(model, strategy="loop", chunk_size=4)`` forwards them here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.engine import functional
from mamlkit.exec import exactness, kernels, strategies, tuning
from mamlkit.exec import threads as thread_plan
from mamlkit.exec.kernels import fusion
from mamlkit.exec.strategies import Strategy, TaskFn, Work

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
        threads: the thread plan of every call (:func:`mamlkit.exec.threads.choose`): ``N`` intra-op threads
            and task workers, ``0`` the trainer's choice (one intra-op thread on the CPU, a task worker per
            core), ``None`` one intra-op thread with the caller's torch thread count as task workers
            (:func:`mamlkit.exec.threads.for_caller`). The caller's settings are restored after each call.
    """

    def __init__(self, model: nn.Module, strategy: str = "auto", *, chunk_size: int | None = None,
                 checkpoint_inner: bool = False, memory_budget_mb: float = 0.0, iterations: int | None = None,
                 fast_kernels: bool | None = None, threads: int | None = None):
        if memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0 (0: no limit), got {memory_budget_mb}")
        device = next(model.parameters()).device
        if threads is not None:
            thread_plan.choose(threads, str(device))  # refuses a negative count now, not on the first call
        self.model, self.device, self.threads = model, device, threads
        self._vmap_failed = False  # evaluation found that vmap cannot run the model: it runs in the loop
        self.strategy: Strategy = strategies.choose_strategy(strategy, model, device, chunk_size or None,
                                                             checkpoint_inner=checkpoint_inner)
        self.checkpoint_inner = checkpoint_inner
        self.memory_budget_mb = memory_budget_mb
        self.iterations = iterations
        if fast_kernels is not None:
            kernels.set_enabled(fast_kernels)
        # functional.call runs a Sequential of built-in layers as its fused layer list while a kernels mode is on
        functional.set_module_view(fusion.fused)
        self._probes: dict[tuple[int, bool], exactness.Probe] = {}  # what the model runs: see check()
        # a strategy asked for by name has not yet run this model (its first error is explained, see
        # _first_run); auto's trial proves (or drops) its own
        self.proven = self.strategy.auto or self.strategy.name == "loop"

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> Executor:
        """The executor a :class:`~mamlkit.config.TrainConfig` asks for."""
        return cls(model, cfg.strategy, chunk_size=cfg.chunk_size or None, checkpoint_inner=cfg.checkpoint_inner,
                   memory_budget_mb=cfg.memory_budget, iterations=cfg.iterations, fast_kernels=cfg.fast_kernels,
                   threads=cfg.threads)

    # --- running tasks -----------------------------------------------------------------------------

    def map_tasks(self, fn: TaskFn, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-task losses ``[T]`` and query predictions ``[T, N_q, ...]``, keeping the autograd graph."""
        losses, preds = self._first_run(fn, batch, lambda: strategies.map_tasks(fn, batch, self.strategy))
        if not self.strategy.vectorize and strategies._second_order(fn):
            strategies.math_attention_in_backward(losses)  # the caller's backward may recompute checkpoints
        return losses, preds

    def backward_tasks(self, fn: TaskFn, batch: TaskBatch, weight: float = 1.0,
                       params: Iterable[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Back-propagate ``weight * mean_t loss_t`` chunk by chunk (see :func:`strategies.backward_tasks`)."""
        return self._first_run(fn, batch, lambda: strategies.backward_tasks(fn, batch, self.strategy, weight, params))

    def backward(self, work: Work, batch: TaskBatch, weight: float = 1.0) -> tuple[Tensor, Tensor]:
        """Accumulate ``weight ×`` the meta-gradient of ``work`` on ``batch`` into ``work.params[k].grad`` (see
        :func:`strategies.backward_over_tasks`); ``auto``'s trial runs first if it has not (:meth:`ready`).
        Returns the detached per-task losses ``[T]`` and query predictions."""
        self.ready(work, batch)
        fn = work.build(work.params)
        return self._first_run(fn, batch, lambda: strategies.backward_over_tasks(work.build, work.params, batch,
                                                                                 self.strategy, weight, fn=fn))

    def trial_backward(self, work: Work, batch: TaskBatch, strategy: Strategy) -> tuple[Tensor, Tensor]:
        """:meth:`backward` with ``strategy`` instead of the executor's own, as ``auto``'s trial and the memory
        probe run a candidate: no trial of its own, and a candidate's error raised as torch's (the trial names
        it), except an op that cannot give the meta-gradient under any strategy (one ``DifferentiationError``)."""
        fn = work.build(work.params)
        return self._explained(fn, batch, strategy, lambda: strategies.backward_over_tasks(
            work.build, work.params, batch, strategy, fn=fn))

    def _first_run(self, fn: TaskFn, batch: TaskBatch, run: Callable[[], T]) -> T:
        """Run ``run`` with the executor's strategy (:meth:`_explained`). When a strategy named explicitly (not
        the loop) raises on its first batch, say which strategy failed and which run any model, instead of
        torch's error alone. The trainer finds this in its trial before training
        (:func:`mamlkit.exec.tuning.settle_strategy`); a Python caller's first call is where it shows. Later
        errors pass unchanged: by then the strategy has run this model."""
        try:
            out = self._explained(fn, batch, self.strategy, run)
        except UserError:
            raise
        except Exception as err:
            if self.proven:
                raise
            raise tuning.cannot_run(self.strategy.name, err) from err
        self.proven = True
        return out

    def _explained(self, fn: TaskFn, batch: TaskBatch, strategy: Strategy, run: Callable[[], T]) -> T:
        """Check the model (:meth:`check`), then run ``run``. An op that cannot give the meta-gradient is one
        :class:`~mamlkit.exec.exactness.DifferentiationError` whatever the strategy."""
        found = self.check(fn, batch, strategy)
        try:
            return run()
        except UserError:
            raise
        except Exception as err:
            why = exactness.explain(err, found)
            if why is not None:
                raise why from err
            raise

    def check(self, fn: TaskFn, batch: TaskBatch, strategy: Strategy | None = None) -> exactness.Probe:
        """What the model runs (:func:`mamlkit.exec.exactness.probe`), found once per train/eval setting and
        order: raises for an op without the derivatives the meta-gradient needs, and refuses ``threads`` for
        a model that draws random numbers (an inactive dropout draws none and is not refused). ``strategy``: the
        one about to run (default: the executor's)."""
        second = strategies._second_order(fn) and torch.is_grad_enabled()
        key = (exactness.training_key(self.model), second)
        found = self._probes.get(key)
        if found is None:
            found = self._probes[key] = exactness.probe(self.model, fn, batch, second)
        if found.random_ops and (strategy or self.strategy).threaded:
            raise tuning.StrategyError(exactness.threads_refusal(found.random_ops))
        return found

    def random_ops(self) -> tuple[str, ...]:
        """The random aten ops the model ran in its current train/eval setting (empty until it ran)."""
        key = exactness.training_key(self.model)
        return tuple(sorted({op for (k, _), p in self._probes.items() if k == key for op in p.random_ops}))

    # --- evaluation and adaptation -----------------------------------------------------------------

    def map(self, fn: Callable[..., Any], *args: Any, shared: tuple = ()) -> Any:
        """``fn(*shared, *slice)`` on each task's slice of ``args`` (tensors, or dicts of tensors, with a leading
        task dimension), its outputs stacked over tasks (:func:`strategies.map_args`): evaluation's per-task
        work, which builds no meta-gradient. ``shared``: arguments every task gets whole, leading ``fn``'s (the
        parameters all tasks start from, beside each task's episodes). Vectorised where the strategy is (vmap,
        compile, ``auto`` before its trial), else task by task (loop, threads); where vmap cannot run the model
        (an op without a batching rule, a tensor's value read in Python, random draws it refuses), in the loop
        from then on."""
        return self._vectorised_or_loop(lambda: strategies.map_args(fn, args, vectorize=True, shared=shared),
                                        lambda: strategies.map_args(fn, args, vectorize=False, shared=shared))

    def evaluate_tasks(self, fn: TaskFn, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-task losses ``[T]`` and query predictions of ``fn`` for evaluation, with the strategy (chunks
        and threads included), or in the loop where vmap cannot run the model (see :meth:`map`)."""
        looped = Strategy(vectorize=False, chunk_size=self.strategy.chunk_size) if self.strategy.vectorize \
            else self.strategy
        return self._vectorised_or_loop(lambda: strategies.map_tasks(fn, batch, self.strategy),
                                        lambda: strategies.map_tasks(fn, batch, looped))

    def _vectorised_or_loop(self, vectorised: Callable[[], T], loop: Callable[[], T]) -> T:
        """``vectorised()`` where the strategy vectorises and vmap has run this model, else ``loop()``; the
        first time vmap cannot run it (any op without a batching rule), the loop from then on."""
        with self.planned():
            if self.strategy.vectorize and not self._vmap_failed:
                try:
                    return vectorised()
                except UserError:
                    raise
                except Exception as err:  # noqa: BLE001 - any op vmap cannot run; the loop runs every model
                    self._vmap_failed = True
                    log.info("mamlkit: vmap cannot run this model's evaluation (%s: %s); its tasks run in a loop",
                             type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return loop()

    # --- threads -----------------------------------------------------------------------------------

    def plan(self, threads: int | None = None) -> thread_plan.ThreadPlan:
        """The thread plan of ``threads`` (default: the executor's own, see the class's ``threads``)."""
        requested = self.threads if threads is None else threads
        if requested is None:
            return thread_plan.for_caller(str(self.device))
        return thread_plan.choose(requested, str(self.device))

    def planned(self, threads: int | None = None) -> contextlib.AbstractContextManager:
        """Run the enclosed code under :meth:`plan`, then give the caller's thread settings back. Inside an
        enclosing plan (a command's ``--threads``, the trainer's) the enclosing one holds."""
        return thread_plan.planned(self.plan(threads))

    def plan_backward(self, loss: Tensor) -> None:
        """Run the backward pass through ``loss`` under the plan's intra-op threads as well: ``meta_loss``
        returns its loss, and the backward, most of a meta-iteration's time, runs after the call returned.
        A hook on the loss's node sets the count when a backward pass reaches it, and a callback of the
        autograd engine puts the caller's back when that pass ends (the engine runs no callback after a
        backward that raised: then the plan's count stays set)."""
        node = loss.grad_fn
        if node is None:
            return

        def start(grad_outputs):
            if thread_plan.active() is not None:  # an enclosing plan (the trainer's) holds
                return None
            saved, wanted = torch.get_num_threads(), self.plan().intra_op
            if wanted != saved:
                torch.set_num_threads(wanted)
                torch.autograd.Variable._execution_engine.queue_callback(lambda: torch.set_num_threads(saved))
            return None

        node.register_prehook(start)

    # --- choosing the strategy ---------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Whether the strategy is fixed (an explicit one, or ``auto`` after its trial)."""
        return not self.strategy.auto

    def ready(self, work: Work, batch: TaskBatch) -> None:
        """Before a meta-loss or meta-gradient of ``work``: run ``auto``'s trial on ``batch`` if it has not run.
        Not under ``torch.no_grad()``: the trial times meta-gradients, and a call without one (finite
        differences, a validation loss) runs as the strategy starts, with the same numbers."""
        if self.strategy.auto and torch.is_grad_enabled():
            self.settle(work, batch, say=log.info)

    def settle(self, work: Work, batch: TaskBatch, *, iterations: int | None = None,
               memory_budget_mb: float | None = None, say: Callable[[str], None] = print) -> Strategy:
        """Fix the strategy for a run of ``iterations`` meta-iterations (default: the executor's) on batches
        like ``batch``: measures memory, fits the budget (default: the executor's) and, with ``auto``, times
        the candidates (:func:`mamlkit.exec.tuning.settle_strategy`), each through this executor's own
        backward of ``work``. The gradients of ``work.params`` and the global RNG are left as they were."""
        runs = iterations if iterations is not None else (self.iterations or 0)
        budget = self.memory_budget_mb if memory_budget_mb is None else memory_budget_mb
        with self.planned():  # the candidates are timed under the threads they will run with
            self.strategy = tuning.settle_strategy(self, work, batch, iterations=runs, memory_budget_mb=budget,
                                                   say=say)
        self.proven = True
        return self.strategy

    def resume(self, name: str | None) -> None:
        """Keep the strategy a checkpointed run measured and used (its recorded name), so a resumed ``auto``
        run computes exactly the same numbers without a new trial. An explicit strategy stays as asked."""
        if self.strategy.auto and name:
            self.strategy = Strategy.from_name(name)
            self.proven = True  # the checkpointed run ran this model with it

    def __repr__(self) -> str:
        return f"Executor({self.strategy.name}{', auto' if self.strategy.auto else ''})"
