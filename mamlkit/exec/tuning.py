"""Choose the execution strategy by measuring it, and say how much memory it will take.

No single strategy wins everywhere (see :mod:`mamlkit.exec.strategies` and benchmarks/RESULTS.md): vmap
wins for small models, the loop for Conv nets with many query images on the CPU, tasks on threads
for Conv nets with little work per task and for a small transformer on several CPU cores, a compiled
meta-gradient for dispatch-bound MLPs in long runs. Before training, :func:`settle_strategy`

1. measures the peak tensor memory of each candidate on the first batch (:mod:`mamlkit.exec.memory`)
   and prints the estimate for the whole meta-batch;
2. under ``--memory-budget``, chunks vmap (or drops a candidate) so the estimate fits;
3. with ``--strategy auto``, times the candidates on that batch and keeps the fastest.

Every candidate should compute the same meta-gradient (tests check this to 1e-10 in float64); with
``auto`` that is checked, not assumed: the loop's meta-gradient on the trial batch is computed first, and
a candidate whose own differs by more than rounding (:data:`AGREEMENT`) is dropped with the difference.
So the choice changes speed and memory, never the numbers beyond floating-point rounding. The trial is
handed what the executor is (its :class:`~mamlkit.exec.strategies.Work`: a per-task builder and the
meta-parameters) and runs each candidate through the executor's own backward
(:meth:`~mamlkit.exec.executor.Executor.trial_backward`), never through a learner. The gradients of the
meta-parameters and the global RNG are left as they were.
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.exec import threads
from mamlkit.exec.exactness import DifferentiationError
from mamlkit.exec.memory import ProbeStopped, gradient_peak, mb
from mamlkit.exec.strategies import Strategy, Work, _has_conv

# A compiled meta-gradient costs tens of seconds to build on a CPU; below this many iterations it
# cannot pay that back, so ``auto`` does not try it.
COMPILE_MIN_ITERATIONS = 2_000
# ``auto`` takes the candidate with the least memory among those within 10% of the fastest: on a
# 2-core VM, repeated trials of the same candidates differed by about 10% (docs/performance-notes.md),
# so a tighter window chose by noise, often the hungrier candidate.
NEAR_FASTEST = 1.10
# timed rounds of the interleaved trial (after one warm-up round); each timed call follows an untimed one
TRIAL_ROUNDS = 3
# ``auto`` does not time a candidate that needs this many times the memory of the leanest one (and over
# 64 MB), nor measure it beyond one task: its trial would set the run's peak memory (unchunked vmap: 3.4 GB
# on Omniglot 20w1s; on 5w1s, 179 MB of tensors took peak RSS from 483 to 784 MB). In the measured runs
# (docs/performance-notes.md) no other candidate above 4× the leanest was the fastest: vmap in chunks of 4 on
# 20w1s (7×) was slower than threads (2×). ``--strategy vmap`` still asks for it. Below the floor a candidate is
# timed whatever its ratio: tens of MB are a small part of a process that holds torch (about 300 MB), and on
# Omniglot 5w1s at meta-batch 8 vmap's 45 MB (9× the loop's 5 MB) ran 1.4× the loop's speed at one thread
# (benchmarks/api_speed.py); with a floor of 32 MB ``auto`` never timed it and kept the slower loop.
MEMORY_SKIP_RATIO, MEMORY_SKIP_FLOOR = 4, 64 * 2**20
# How far ``auto`` lets a candidate's meta-gradient on the trial batch be from the loop's (the largest entry of
# the difference over the largest of the loop's): rounding only. The strategies agree to ~1e-15 in float64
# (tests/test_model_zoo.py); in float32 they sum in other orders (vmap's batched kernels): 3e-7 apart on the zoo's
# transformer encoder, 9e-6 on its ResNet-12 (measured on the CPU), far below 1e-3, while
# the errors this catches are of order one (a term of the meta-gradient lost: 14% off, tests/test_exactness.py).
AGREEMENT = {torch.float64: 1e-9, torch.float32: 1e-3}
AGREEMENT_LOW = 5e-2  # float16 and bfloat16


def estimate(executor: Any, work: Work, batch: TaskBatch, strategy: Strategy,
             enough: int | None = None) -> tuple[int, int, bool]:
    """``(fixed, per_task, exact)``: the peak tensor memory of one meta-iteration is about
    ``fixed + per_task × (tasks run together)`` bytes. Measured on one and two tasks of ``batch`` through
    ``executor``'s backward of ``work`` (:func:`backward_peak`);
    ``exact`` is False where the measurement was stopped early and ``per_task`` is a lower bound.

    With ``enough``, a vectorised strategy whose one-task peak times the batch's tasks exceeds it stops
    at one task (as soon as that task's tensors pass ``enough / tasks``) and returns ``(0, one)``, a
    lower bound: two tasks under vmap take twice a task's memory (1.65 GB of
    tensors on mini-ImageNet 5w1s, where a whole meta-iteration of the loop needs 420 MB). That is
    exact for one task at a time and an estimate beyond (on mini-ImageNet 24% below the two-task one).
    """
    probe = strategy.replace(compiled=False, chunk_size=None, workers=0)
    limit = None
    if enough is not None and probe.vectorize and batch.num_tasks > 1:
        limit = enough // batch.num_tasks  # past this, one task already proves the candidate too big
    try:
        one = backward_peak(executor, work, batch[:1], probe, limit)
    except ProbeStopped as stop:  # stopped early: a lower bound, and the process's peak stays low
        return 0, stop.nbytes, False
    if strategy.threaded:
        return 0, one, True  # each worker holds one task's graph and gradients (the tracker sees one thread)
    if not probe.vectorize or batch.num_tasks < 2:
        return one, 0, True  # the loop frees each task's graph before the next
    if enough is not None and one * batch.num_tasks > enough:
        return 0, one, True
    two = backward_peak(executor, work, batch[:2], probe)
    per_task = max(two - one, 0)
    return one - per_task, per_task, True


def _skip_above(leanest: int) -> int:
    """Bytes of tensors above which ``auto`` does not time a candidate (see MEMORY_SKIP_RATIO)."""
    return max(MEMORY_SKIP_RATIO * leanest, MEMORY_SKIP_FLOOR)


def _together(strategy: Strategy, num_tasks: int) -> int:
    """How many tasks' graphs are alive at once."""
    if strategy.threaded:
        return min(strategy.num_workers(), num_tasks)
    return (strategy.chunk_size or num_tasks) if strategy.vectorize else 1


def _fit_budget(strategy: Strategy, fixed: int, per_task: int, num_tasks: int, budget: int) -> Strategy | None:
    together = _together(strategy, num_tasks)
    if fixed + per_task * together <= budget:
        return strategy
    if not strategy.vectorize or fixed + per_task > budget:
        return None
    return strategy.replace(chunk_size=max(1, (budget - fixed) // per_task))


def backward_peak(executor: Any, work: Work, batch: TaskBatch, strategy: Strategy, limit: int | None = None
                  ) -> int:
    """Peak tensor bytes of one backward of ``work`` on ``batch`` under ``strategy``
    (:meth:`~mamlkit.exec.executor.Executor.trial_backward`); the gradients and the RNG are left as they were.
    ``limit``: as in :func:`mamlkit.exec.memory.peak_tensor_bytes`."""
    return gradient_peak(lambda: executor.trial_backward(work, batch, strategy), work.params.values(), limit)


def _time(executor: Any, work: Work, batch: TaskBatch, strategy: Strategy, repeats: int = 3) -> float:
    """Seconds per backward (the best of ``repeats`` after one warm-up call)."""
    return _time_all(executor, work, batch, [strategy], rounds=repeats)[0]


def _time_all(executor: Any, work: Work, batch: TaskBatch, strategies: list[Strategy], rounds: int = 3,
              say: Callable[[str], None] | None = None) -> list[float]:
    """Seconds per backward of ``work`` (``executor.trial_backward``) under each of ``strategies``: one
    warm-up call each, then ``rounds`` rounds that time every strategy once, keeping each one's best.
    Interleaved rather than one strategy after another, so that a change in the machine's load during the
    trial does not favour whichever ran first. Before each call, the memory the previous strategy freed is
    handed back to the OS; after the warm-up round, each strategy then runs once untimed (which warms the
    allocator's heap again, as in training) and once timed. So the trial's peak memory is the hungriest
    candidate's, not the sum of every candidate's leftovers, each kept in its own malloc arena
    (mini-ImageNet 5w1s: 2.5 GB before, 2.2 GB after, the threads candidate's own peak). A strategy that
    fails its warm-up gets ``inf`` (and a message through ``say``); with no ``say`` the error propagates."""
    params = list(work.params.values())
    grads = [p.grad for p in params]
    best = [math.inf] * len(strategies)
    ok = [True] * len(strategies)
    try:
        with torch.random.fork_rng(devices=[]):
            for r in range(rounds + 1):
                for i, strategy in enumerate(strategies):
                    if not ok[i]:
                        continue
                    start = None
                    try:
                        if len(strategies) > 1:
                            _release_freed_memory()
                            if r:
                                executor.trial_backward(work, batch, strategy)
                        start = time.perf_counter()
                        executor.trial_backward(work, batch, strategy)
                    except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile
                        if say is None:
                            raise
                        ok[i] = False
                        say(f"mamlkit: strategy {strategy.name} unavailable here ({_reason(err)}); skipped")
                        continue
                    if r:  # round 0 is the warm-up
                        best[i] = min(best[i], time.perf_counter() - start)
        return best
    finally:
        for p, g in zip(params, grads):  # the trial's gradients go; the caller's stay
            p.grad = g


def _reason(err: BaseException) -> str:
    """One line naming an exception, for the log."""
    text = str(err).splitlines()[0][:160] if str(err) else ""
    return f"{type(err).__name__}: {text}"


class StrategyError(UserError, RuntimeError):
    """A strategy named explicitly cannot run the model (torch's error is the cause)."""


def cannot_run(name: str, err: BaseException) -> StrategyError:
    """The error for an explicitly named strategy that raised on the model: which one, why, what works.
    Raised by the trainer's trial and by the executor's first call from Python."""
    return StrategyError(f"strategy {name} cannot run this model ({_reason(err)}). Use strategy='auto', which "
                         "runs the strategies that work for it, or 'loop', which runs any model that runs in "
                         "plain PyTorch")


def _candidates(executor: Any, work: Work, iterations: int) -> list[Strategy]:
    """What ``auto`` times: the strategies that can win for this model here, leanest first (so that a
    vectorised candidate's memory probe can stop as soon as it is far above a leaner one's, see
    :func:`estimate`). Whole tasks on threads are one for every model wherever they can run in parallel
    (:func:`_threads_usable`): they won for Conv nets with little work per task and, on a loaded machine,
    for a small transformer (benchmarks/RESULTS.md)."""
    s = executor.strategy
    if not s.auto:
        return [s]
    vmap, loop = Strategy(True, s.chunk_size, auto_chunk=not s.chunk_size), Strategy(False, s.chunk_size)
    on_threads = [Strategy(False, workers=-1)] if _threads_usable(executor) else []
    if _has_conv(executor.model):
        # Conv nets: vmap's grouped convolutions win with few query images, the loop with many (on a GPU
        # too: large images, few tasks), threads with little work per task (benchmarks/RESULTS.md);
        # compiling them takes minutes and lost to the loop when measured.
        return [loop, *on_threads, vmap]
    # Models without convolutions are dispatch-bound: vmap always beat the loop, by 4-10× when measured (the
    # loop still runs a model vmap cannot, see _FALLBACKS; threads are the loop's tasks run in parallel, with
    # the loop's numbers), and a compiled meta-gradient beats vmap by ~6× once its compile time is paid back.
    out = [*on_threads, vmap]
    if work.compilable and iterations >= COMPILE_MIN_ITERATIONS and _simple(executor.model):
        out.append(Strategy(True, s.chunk_size, compiled=True))
    return out


# Tried only when every candidate raised during its trial (an operation vmap cannot batch, say): the loop
# runs any model that runs at all.
_FALLBACKS = [Strategy(False)]


def _threads_usable(executor: Any) -> bool:
    """Whether ``auto`` times whole tasks on threads: on the CPU, with more than one task worker
    (:func:`mamlkit.exec.threads.task_workers`) and more than one core to run them, for a model that drew no
    random numbers when it ran (dropout, found by what runs: ``Executor.random_ops``; on threads the draws
    would follow thread timing). Each worker runs one intra-op thread and the workers meet once per
    meta-iteration, not once per op, so a busy machine does not make them wait on every op as several
    intra-op threads would (:mod:`mamlkit.exec.threads`)."""
    cpu = executor.device.type == "cpu"
    return cpu and min(threads.task_workers(), threads.cores()) > 1 and not executor.random_ops()


_SIMPLE = (nn.Linear, nn.Flatten, nn.Identity, nn.Dropout, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


def _simple(model: nn.Module) -> bool:
    """MLP-like models, whose compiled meta-gradient builds in seconds. Others (attention, recurrent
    layers, a user's custom module) may compile for minutes or not at all, so ``auto`` leaves them to
    vmap; ``--strategy compile`` still asks for it explicitly."""
    def simple(m: nn.Module) -> bool:
        if isinstance(m, nn.MultiheadAttention):  # it lives in torch.nn.modules.activation too
            return False
        return isinstance(m, _SIMPLE) or type(m).__module__ in ("torch.nn.modules.activation", "mamlkit.models")

    return all(simple(m) for m in model.modules()
               if not list(m.children()) or any(True for _ in m.parameters(recurse=False)))


@functools.cache
def _glibc() -> Any:
    """glibc, for its malloc controls; None where the C library is another (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _release_freed_memory() -> None:
    """Hand the memory the trial freed back to the OS (glibc's ``malloc_trim``). The hungrier candidates'
    trials leave freed pages in the allocator's heaps, which would otherwise stay in the training
    run's resident memory (docs/performance-notes.md). A no-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc malloc settings for training (see :func:`tune_malloc`): allocations up to 32 MB (glibc's largest
# mmap threshold) come from the heap, and the heap keeps up to 1 GB of freed memory for reuse.
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 * 2**20, 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def tune_malloc() -> bool:
    """Let glibc's allocator keep freed memory for reuse instead of returning it to the OS at once.

    A meta-iteration frees the same large activation and gradient tensors on every task and allocates
    them again on the next. With glibc's defaults, those above its mmap threshold are unmapped on
    free, and freed heap tops above the trim threshold are returned, so each task page-faults its
    memory in again (zeroed by the kernel). Fixing the thresholds (``mallopt``; the same as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824``)
    made the loop 1.27-1.41× faster on mini-ImageNet 5w1s at +8-13% peak RSS, and changed nothing
    measurable on Omniglot 5w1s (docs/performance-notes.md). Process-wide and kept
    until exit; the trainer calls it unless ``--no-tune-malloc``. Returns False where there is no
    glibc (macOS, musl) and nothing was changed.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                                     and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def settle_strategy(executor: Any, work: Work, batch: TaskBatch, *, iterations: int, memory_budget_mb: float = 0.0,
                    say: Callable[[str], None] = print) -> Strategy:
    """The strategy ``executor`` should keep for a run of ``iterations`` meta-iterations of ``work`` on batches
    like ``batch`` (:meth:`~mamlkit.exec.executor.Executor.settle` keeps it).

    Prints the memory estimate and, with ``auto``, the time per meta-iteration of each candidate. ``auto``
    first computes the loop's meta-gradient on ``batch`` and keeps only candidates that agree with it
    (:data:`AGREEMENT`); a model that draws random numbers gets the first candidate that runs, untimed,
    so that a seed gives the same run whatever the machine's load. Raises :class:`UserError` when no
    strategy runs the model (naming each candidate and why) or fits ``memory_budget_mb`` (0: no budget),
    and :class:`~mamlkit.exec.exactness.DifferentiationError` when the model's ops cannot give the
    meta-gradient under any strategy.
    """
    auto = executor.strategy.auto
    reference = _loop_reference(executor, work, batch) if auto else None
    random_ops = executor.random_ops()
    options, needs, failed = _fit_candidates(executor, work, batch, iterations, memory_budget_mb, say)
    if not options and failed:
        raise _nothing_runs(failed)
    if not options:
        raise UserError(f"no execution strategy fits --memory-budget {memory_budget_mb:g} MB. Raise the "
                        "budget, lower --meta-batch or --inner-steps, or use --checkpoint-inner (memory "
                        "independent of the inner steps)")
    if len(options) > 1:
        heavy = [c for c in options if needs[c.name] > _skip_above(min(needs.values()))]
        if heavy:
            say(f"mamlkit: not timing {', '.join(c.name for c in heavy)}: over {MEMORY_SKIP_RATIO}× the memory of "
                "the leanest candidate")
            options = [c for c in options if c not in heavy]
    if auto and random_ops:
        say(f"mamlkit: the model draws random numbers (aten::{', aten::'.join(random_ops)}); strategy auto keeps "
            f"{options[0].name} without timing, so that a seed gives the same run whatever the machine's load")
        options = options[:1]
    elif auto and isinstance(reference, dict):
        options = _agreeing(executor, work, batch, options, reference, failed, say)
    if len(options) > 1:
        seconds = _time_all(executor, work, batch, options, rounds=TRIAL_ROUNDS, say=say)
        timed = [(t, c) for t, c in zip(seconds, options) if t < math.inf]
        if not timed:
            raise _nothing_runs(failed + [(c, RuntimeError("it raised in its timed trial")) for c in options])
        say("mamlkit: strategy timing (s per meta-iteration): "
            + ", ".join(f"{c.name} {t:.4f}" for t, c in timed))
        # the fastest, or a leaner one within NEAR_FASTEST of it
        best = min(t for t, _ in timed)
        options = [min((c for t, c in timed if t <= best * NEAR_FASTEST), key=lambda c: needs[c.name])]
        _release_freed_memory()
    elif not options:  # every candidate disagreed with the loop, which ran: the loop is exact by definition
        say("mamlkit: strategy auto keeps the loop, whose meta-gradient the others did not match")
        options = [Strategy(False)]
    elif options[0].compiled:  # compile now, so a failure is a clear message rather than a mid-run traceback
        try:
            _time(executor, work, batch, options[0], repeats=0)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"--strategy compile failed on this machine ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}). torch.compile needs a "
                            "working C++ compiler on the CPU; use --strategy vmap (same numbers)") from err
    return options[0]


def _fit_candidates(executor: Any, work: Work, batch: TaskBatch, iterations: int, memory_budget_mb: float,
                    say: Callable[[str], None]) -> tuple[list[Strategy], dict[str, int], list]:
    """``(options, needs, failed)``: the candidates that ran one and two tasks of ``batch`` and fit the budget
    (vmap chunked to fit), their bytes of tensors per meta-iteration, and ``(candidate, error)`` for those
    that raised. The plain loop is tried only when every candidate raised."""
    budget = int(memory_budget_mb * 2**20) if memory_budget_mb else None
    options, needs, failed = [], {}, []
    candidates = _candidates(executor, work, iterations)
    fallbacks = [c for c in _FALLBACKS if c not in candidates]
    for i, cand in enumerate(candidates + fallbacks):
        if i >= len(candidates) and (options or not failed):
            break  # the plain loop only when every candidate raised: auto runs whatever some strategy can
        # one task can tell that a candidate will not be timed (far above the leanest so far) or cannot fit the
        # budget even one task at a time; then the two-task measurement, twice a task's memory, is not made
        if budget is not None:
            enough = budget * batch.num_tasks
        else:
            enough = _skip_above(min(needs.values())) if needs else None
        try:
            fixed, per_task, exact = estimate(executor, work, batch, cand, enough)
        except DifferentiationError:
            raise  # the model's ops, not the strategy: every strategy would fail alike
        except Exception as err:  # noqa: BLE001 - a candidate that cannot run this model
            _release_freed_memory()
            if not executor.strategy.auto:
                raise (err if isinstance(err, UserError) else cannot_run(cand.name, err)) from err
            failed.append((cand, err))
            say(f"mamlkit: strategy {cand.name} unavailable for this model ({_reason(err)}); skipped")
            continue
        _release_freed_memory()  # so that the next measurement does not sit on top of this one's leftovers
        need = fixed + per_task * _together(cand, batch.num_tasks)
        fitted = cand if budget is None else _fit_budget(cand, fixed, per_task, batch.num_tasks, budget)
        note = (f"~{mb(need)} of tensors per meta-iteration ({mb(per_task)} per task run together)" if exact else
                f"over {mb(need)} of tensors per meta-iteration (over {mb(per_task)} per task; probe stopped there)")
        if fitted is None:
            say(f"mamlkit: memory: {cand.name} needs {note}; over the budget of {mb(budget)}")
            continue
        if fitted is not cand:
            note += f"; chunked to {fitted.chunk_size} tasks for the budget of {mb(budget)}: " \
                    f"~{mb(fixed + per_task * fitted.chunk_size)}"
        say(f"mamlkit: memory estimate, {fitted.name}: {note}")
        options.append(fitted)
        needs[fitted.name] = fixed + per_task * _together(fitted, batch.num_tasks)
        quarter = batch.num_tasks // 4
        if (cand.auto_chunk and fitted.vectorize and not fitted.compiled and not fitted.chunk_size and quarter >= 2
                and exact):  # a stopped probe's lower bound says nothing about a quarter's memory
            # vmap in quarters often runs as fast with a fraction of the memory (benchmarks/RESULTS.md)
            chunked = fitted.replace(chunk_size=quarter)
            options.append(chunked)
            needs[chunked.name] = fixed + per_task * quarter
    if options:
        return options, needs, failed
    return options, needs, failed if all(any(c == f for f, _ in failed) for c in candidates) else []


def _nothing_runs(failed: list[tuple[Strategy, BaseException]]) -> UserError:
    """``auto``'s refusal: every candidate, each with its reason; the loop's error (else the last) as its cause,
    so a Python caller sees torch's own error without reading the log."""
    why = "; ".join(f"{c.name}: {_reason(err)}" for c, err in failed)
    cause = next((err for c, err in failed if c == Strategy(False)), failed[-1][1])
    error = UserError(f"no execution strategy could run this model. {why}. The loop runs any model that runs in "
                      "plain PyTorch: its error above is torch's own")
    error.__cause__ = cause
    return error


def _meta_gradient(executor: Any, work: Work, batch: TaskBatch, strategy: Strategy
                   ) -> dict[str, torch.Tensor | None]:
    """The meta-gradient of ``work`` on ``batch`` under ``strategy``, with the gradients of ``work.params`` and
    the global RNG left as they were."""
    params = work.params
    saved = {k: p.grad for k, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
        with torch.random.fork_rng(devices=[]):
            executor.trial_backward(work, batch, strategy)
        return {k: None if p.grad is None else p.grad.detach().clone() for k, p in params.items()}
    finally:
        for k, p in params.items():
            p.grad = saved[k]


def _loop_reference(executor: Any, work: Work, batch: TaskBatch) -> dict[str, torch.Tensor] | BaseException:
    """The loop's meta-gradient on ``batch``, which ``auto``'s candidates must match, or the loop's error. Its
    first call also probes what the model runs (``Executor.check``)."""
    try:
        return _meta_gradient(executor, work, batch, Strategy(False))
    except DifferentiationError:
        raise
    except Exception as err:  # noqa: BLE001 - the candidates' own trials say what runs
        return err


def difference(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None]) -> float:
    """The largest entry of ``got - want`` over the largest entry of ``want`` (missing gradients are zero)."""
    diff = scale = 0.0
    for k, w in want.items():
        g = got.get(k)
        if g is None and w is None:
            continue
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        diff = max(diff, (g.double() - w.double()).abs().max().item())
        scale = max(scale, w.abs().max().item())
    return diff / scale if scale > 0 else diff


def _agreeing(executor: Any, work: Work, batch: TaskBatch, options: list[Strategy],
              reference: dict[str, torch.Tensor], failed: list, say: Callable[[str], None]) -> list[Strategy]:
    """The ``options`` whose meta-gradient on ``batch`` is the loop's (``reference``) within :data:`AGREEMENT`;
    each other one is said and added to ``failed`` with its difference. The loop itself is not rerun."""
    dtype = next(iter(work.params.values())).dtype
    tolerance = AGREEMENT.get(dtype, AGREEMENT_LOW)
    kept = []
    for cand in options:
        if cand.name.startswith("loop"):
            kept.append(cand)
            continue
        try:
            got = _meta_gradient(executor, work, batch, cand)
        except DifferentiationError:
            raise
        except Exception as err:  # noqa: BLE001
            failed.append((cand, err))
            say(f"mamlkit: strategy {cand.name} unavailable for this model ({_reason(err)}); skipped")
            continue
        off = difference(got, reference)
        del got
        _release_freed_memory()
        if off <= tolerance:
            kept.append(cand)
            continue
        err = RuntimeError(f"its meta-gradient is {off:.2g} off the loop's (relative; the tolerance in "
                           f"{str(dtype).removeprefix('torch.')} is {tolerance:g})")
        failed.append((cand, err))
        say(f"mamlkit: strategy {cand.name} dropped: {err}")
    return kept
