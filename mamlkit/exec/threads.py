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
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_task_workers: int | None = None  # set by the trainer (apply); None: follow torch's thread count


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


def reset() -> None:
    """Forget the trainer's plan: :func:`task_workers` follows torch's thread count again."""
    global _task_workers
    _task_workers = None


def task_workers() -> int:
    """How many tasks the ``threads`` strategy runs at once: the trainer's plan, else torch's thread count."""
    return _task_workers if _task_workers is not None else torch.get_num_threads()
