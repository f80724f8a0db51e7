"""How many threads a training run uses on the CPU, chosen by the trainer when ``--threads`` is 0.

Two kinds of parallelism are available on a CPU:

* intra-op: OpenMP splits every torch op (and every loop of inductor's compiled code) over
  ``torch.get_num_threads()`` threads, which meet at a barrier after each op;
* tasks: the ``threads`` strategy runs whole tasks on worker threads, one intra-op thread each, which
  meet once per meta-iteration.

A barrier costs nothing while every thread has a core. When another process holds one, the thread
that reaches the barrier first spins (libgomp's default wait policy) and then sleeps until the
scheduler runs the preempted thread again, which can take a scheduler time slice (milliseconds)
per op. The sinusoid MLP's ops take microseconds and Omniglot's Conv4's tens of microseconds, so
each op paid that cost: beside one ``while True: pass`` process on 2 cores, the sinusoid run fell
from 171 meta-iterations/s with one thread to 9 with two (benchmarks/contention.py,
benchmarks/RESULTS.md). Passive waiting (``OMP_WAIT_POLICY=passive``) only raised that to 74, and it
can only be set before torch is imported.

So by default a CPU run uses one intra-op thread, which keeps a fair share of the machine under
load, and gives the cores to whole tasks instead (:func:`task_workers`, read by the ``threads``
strategy and by ``auto``'s choice of candidates). ``--threads N`` sets both to N, as before.

Every entry point runs under such a plan, not only training: ``mamlkit eval``, ``adapt``, ``rl eval`` and
``rl adapt`` (``--threads``), and the Python API's calls (``Executor.planned``; a call that names no count
gives the caller's torch thread count to the task workers, :func:`for_caller`): evaluation's and
adaptation's small ops meet the same barriers as training's. Each entry point sets its plan, runs, and
gives the caller's settings back (:func:`planned`), so a Python program's own torch settings are as it
left them after every call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mamlkit.base.limits import check_threads

_task_workers: int | None = None  # set by the trainer (apply); None: follow torch's thread count
_active: ThreadPlan | None = None  # the plan of the outermost `planned` block running, if any


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        return max(os.cpu_count() or 1, 1)


@dataclass(frozen=True, kw_only=True)
class ThreadPlan:
    """``intra_op``: torch's thread count (``torch.set_num_threads``); ``task_workers``: how many
    whole tasks the ``threads`` strategy runs at once."""

    intra_op: int
    task_workers: int


def choose(requested: int, device: str = "cpu") -> ThreadPlan:
    """The plan for ``--threads requested`` (0: the trainer chooses) on ``device``.

    0 on the CPU: one intra-op thread and a task worker per core (see the module docstring). On an
    accelerator the host threads only launch kernels, so torch's own count is kept.
    """
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0: chosen by the trainer), got {requested}")
    check_threads(requested)
    if requested:
        return ThreadPlan(intra_op=requested, task_workers=requested)
    if not str(device).startswith("cpu"):
        n = torch.get_num_threads()
        return ThreadPlan(intra_op=n, task_workers=n)
    return ThreadPlan(intra_op=1, task_workers=cores())


def apply(plan: ThreadPlan) -> None:
    """Make ``plan`` the process's thread setting (torch's count is process-wide too)."""
    global _task_workers
    torch.set_num_threads(plan.intra_op)
    _task_workers = plan.task_workers


def for_caller(device: str = "cpu") -> ThreadPlan:
    """The plan of a Python call that names no thread count (``mamlkit.MAML(model)``): one intra-op
    thread on the CPU, as the trainer's, and the threads the caller gave torch as task workers. A caller
    who set ``torch.set_num_threads(1)`` keeps mamlkit to one core; the default (every core) gives the
    ``threads`` strategy a worker per core, as ``choose(0)`` does. On an accelerator nothing changes."""
    n = task_workers()
    if not str(device).startswith("cpu"):
        return ThreadPlan(intra_op=torch.get_num_threads(), task_workers=n)
    return ThreadPlan(intra_op=1, task_workers=n)


@contextlib.contextmanager
def planned(plan: ThreadPlan) -> Iterator[None]:
    """Run the enclosed code under ``plan``, then put torch's thread count and the task workers back as
    they were: an entry point (a command, ``learner.meta_loss``, ``learner.adapt``) must not leave the
    caller's process changed. Nested blocks keep the outermost plan: the entry point that the user
    configured (``--threads``) decides, not the calls it makes."""
    global _active, _task_workers
    if _active is not None:
        yield
        return
    saved = torch.get_num_threads(), _task_workers
    _active, _task_workers = plan, plan.task_workers
    if saved[0] != plan.intra_op:  # setting the count is not free (MKL, OpenMP): only when it changes
        torch.set_num_threads(plan.intra_op)
    try:
        yield
    finally:
        _active, _task_workers = None, saved[1]
        if torch.get_num_threads() != saved[0]:
            torch.set_num_threads(saved[0])


def active() -> ThreadPlan | None:
    """The plan of the ``planned`` block running now, if any."""
    return _active


def reset() -> None:
    """Forget the trainer's plan: :func:`task_workers` follows torch's thread count again."""
    global _task_workers
    _task_workers = None


def task_workers() -> int:
    """How many tasks the ``threads`` strategy runs at once: the trainer's plan, else torch's thread count."""
    return _task_workers if _task_workers is not None else torch.get_num_threads()
