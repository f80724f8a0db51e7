"""Distributed meta-training over ``torch.distributed``: one process per device, launched by torchrun.

Why not ``DistributedDataParallel``: its reducer fires on the gradients of one ordinary backward
and does not support the double backward through ``autograd.grad(create_graph=True)`` that exact
second-order MAML needs. mamlkit needs no hooks: each rank computes its share of the meta-gradient
with the ordinary engine, then a single ``all_reduce`` sums the gradients of every meta-parameter
(learned inner rates included) and the per-rank metrics, packed in one flat buffer.

Sharding. Meta-batch ``s`` is drawn from ``(seed, "train", s)`` exactly as in a single process;
rank ``r`` of ``R`` keeps the contiguous block :meth:`World.shard` of its ``T`` tasks (block sizes
differ by at most one), so no two ranks train on the same task, and scales its loss by ``n_r / T``:
summed over ranks this is exactly the mean over all ``T`` tasks, however unevenly ``T`` divides.
The tasks of a step do not depend on ``R``, so a run on 2 ranks equals a run on 1 rank (up to the
rounding of the sum), and a checkpoint resumes on any number of ranks. Every rank draws
the whole batch and keeps its block: drawing is cheap next to a meta-step (sinusoid: 0.1 ms of
~14 ms; Omniglot 5-way 1-shot, 32 tasks: ~7 ms of ~1.4 s on one CPU thread), and it leaves the
single-process task stream untouched. One generator per task instead would let each rank draw only
its share, but costs the sinusoid ~30% more per step (one ``sample`` call per task).

Every rank holds the meta-parameters and its own optimiser; rank 0 broadcasts the initial
parameters and, since every rank then applies the same summed gradient, they stay equal.
Only rank 0 logs, validates, evaluates and writes checkpoints (see :func:`mamlkit.loop.train.fit`).

Usage (one machine, 2 processes)::

    torchrun --standalone --nproc_per_node=2 -m mamlkit train omniglot-5w1s --threads 1

More, multi-node included: ``docs/distributed.md``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mamlkit.base.batch import TaskBatch, TaskDistribution, task_generator
from mamlkit.base.errors import UserError

# Set by torchrun (and torch.distributed.launch) for every worker.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("auto", "gloo", "nccl")


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank has crashed or stalled."""


def _collective(fn, *args, **kwargs) -> None:
    # gloo reports a dead peer as a plain RuntimeError; name it, so the message can say what happened.
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        raise CollectiveError(f"{fn.__name__} failed: {e}") from e


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` ranks (``local_rank`` on its node).

    ``World()`` is the single-process world; its collectives are no-ops.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that logs, validates and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is up (even of size 1, e.g. a 1-rank nccl run)."""
        return dist.is_available() and dist.is_initialized()

    def shard(self, num_tasks: int) -> range:
        """This rank's task indices: a contiguous block of ``range(num_tasks)``.

        Blocks are balanced (sizes ``floor`` or ``ceil`` of ``T / R``) and their union over ranks is
        ``range(num_tasks)``, e.g. T=5 on R=2: rank 0 takes ``[0, 1]``, rank 1 ``[2, 3, 4]``.
        """
        if num_tasks < self.size:
            raise UserError(f"meta_batch ({num_tasks}) is smaller than the number of ranks ({self.size}): "
                            "every rank needs a task. Raise --meta-batch or launch fewer processes.")
        return range(self.rank * num_tasks // self.size, (self.rank + 1) * num_tasks // self.size)

    def train_batch(self, tasks: TaskDistribution, seed: int, step: int, num_tasks: int) -> TaskBatch:
        """This rank's block :meth:`shard` of training batch ``step``, from ``(seed, "train", step)``."""
        shard = self.shard(num_tasks)
        return tasks.sample(num_tasks, task_generator(seed, "train", step))[shard.start:shard.stop]

    def backward_and_reduce(self, learner: Any, batch: TaskBatch, num_tasks: int, stopping: bool = False
                            ) -> tuple[dict[str, float], bool]:
        """Fill ``.grad`` with the meta-gradient of the whole meta-batch; return its metrics, and whether
        any rank is ``stopping``.

        ``batch`` holds this rank's ``n_r`` of the ``num_tasks`` tasks. Its gradient is weighted by
        ``n_r / T`` and summed over ranks, so every rank ends with ``∇ (1/T) Σ_{i<T} L_i`` in the
        ``.grad`` of every meta-parameter; metrics (task means) are combined the same way. ``stopping``
        (a stop signal reached this rank) rides on the same reduction, so every rank learns of it at
        the same step and all of them stop after it, with no extra collective.
        """
        weight = batch.num_tasks / num_tasks
        stats = learner.meta_backward(batch, weight=weight)
        if not self.active:
            return stats, stopping
        params = list(learner.meta_parameters().values())
        keys = sorted(stats)
        # A parameter the objective does not reach has no .grad; it still takes part (as zeros) so
        # every rank reduces a buffer of the same layout.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        local = torch.tensor([stats[k] * weight for k in keys] + [float(stopping)], dtype=grads[0].dtype,
                             device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [local])
        _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return {k: v.item() for k, v in zip(keys, flat[offset:])}, bool(flat[-1].item() > 0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place, and return it (itself in a single process). Every rank
        ends with the same bits, so decisions taken from the sum (a line search's) agree across ranks."""
        if self.active and self.size > 1:
            _collective(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``tensor`` over the ranks, in place (itself in a single process)."""
        if self.active and self.size > 1:
            _collective(dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (one small collective; ``flag`` itself in a single process):
        how the ranks agree to stop at the same step."""
        return bool(self.all_reduce_max(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)

    def broadcast_(self, learner: Any) -> None:
        """Copy rank 0's meta-parameters and buffers to every rank, in place."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*learner.meta_parameters().values(), *(b for _, b in learner.model.named_buffers())]:
                _collective(dist.broadcast, t.data, src=0)

    def barrier(self) -> None:
        if self.active:
            _collective(dist.barrier)


def env_world() -> World | None:
    """The :class:`World` torchrun describes in the environment, or ``None`` outside torchrun."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    missing = [v for v in LAUNCH_VARS if v not in os.environ]
    if missing:
        raise UserError(f"incomplete torch.distributed environment: {', '.join(missing)} unset. Launch with "
                        "`torchrun --nproc_per_node=N -m mamlkit train ...`, or unset RANK and WORLD_SIZE to "
                        "run a single process.")
    try:
        world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= world.rank < world.size:
        raise UserError(f"RANK={world.rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world.size})")
    if os.environ["MASTER_PORT"] == "0":
        # torchrun passes port 0 on to its workers, which then wait forever for a store on port 0.
        raise UserError("MASTER_PORT is 0: torchrun's workers cannot connect to it. Use `torchrun --standalone` "
                        "on one machine, or pass a free --master-port (or --rdzv-endpoint HOST:PORT).")
    return world


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` → nccl for a CUDA device, gloo otherwise; an explicit choice is kept."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "nccl" if torch.device(device).type == "cuda" else "gloo"
    return backend


def current() -> World:
    """The world of the process group that is up, or the single-process world."""
    if dist.is_available() and dist.is_initialized():
        env = env_world()
        return World(dist.get_rank(), dist.get_world_size(), env.local_rank if env else 0)
    return World()


_depth = 0          # open sessions in this process (they nest: the CLI's around each fit's)
_owned = False      # whether this module initialised the process group (and so destroys it)


@contextmanager
def session(cfg: Any = None) -> Iterator[World]:
    """Join the torchrun process group for the duration of the block; tear it down in a ``finally``.

    Outside torchrun this yields ``World()`` and does nothing. Sessions nest: the outermost one
    destroys the group, so the CLI holds one group across the MAML and baseline trainings. With
    ``cfg`` (a :class:`~mamlkit.config.TrainConfig`, or a :class:`~mamlkit.rl.config.RLConfig`: gloo on the
    CPU) it initialises the group if needed, using ``cfg.backend`` and ``cfg.dist_timeout`` (seconds any
    collective may wait: a rank that crashed or stalled ends the job with a clear message instead of a
    hang). Without ``cfg`` it only holds.

    Under torchrun with CUDA, each rank uses ``cuda:LOCAL_RANK`` (set before the model is built
    when the CLI opens the outer session); pass ``--device cuda``.
    """
    global _depth, _owned
    env = env_world()
    if env is not None and torch.cuda.is_available() and torch.cuda.device_count() > env.local_rank:
        torch.cuda.set_device(env.local_rank)
    _depth += 1
    failed = False
    try:
        if env is not None and cfg is not None and not dist.is_initialized():
            # meta-RL runs on the CPU and names neither (mamlkit.rl.config.RLConfig): gloo
            backend = resolve_backend(getattr(cfg, "backend", "auto"), getattr(cfg, "device", "cpu"))
            dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist_timeout))
            _owned = True
        yield current() if dist.is_initialized() else (env or World())
    except BaseException as e:
        failed = True
        # A UserError is the same on every rank and the CLI prints it; anything else gets the rank's story.
        if _depth == 1 and env is not None and env.size > 1 and isinstance(e, Exception) \
                and not isinstance(e, UserError):
            print(_failure_message(env, e, cfg), file=sys.stderr, flush=True)
        raise
    finally:
        _depth -= 1
        if _depth == 0 and _owned:
            _owned = False
            # A failed NCCL communicator can block destroy; process exit frees it instead.
            if not (failed and dist.get_backend() == "nccl"):
                dist.destroy_process_group()


def _failure_message(world: World, e: BaseException, cfg: Any) -> str:
    what = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    if isinstance(e, (CollectiveError, dist.DistError)):
        timeout = f" or waited more than dist_timeout={cfg.dist_timeout}s" if cfg is not None else ""
        return (f"mamlkit: rank {world.rank} of {world.size}: a collective failed{timeout} ({what}). "
                "Another rank has probably crashed or stalled; its error is above. Ending the job.")
    return (f"mamlkit: rank {world.rank} of {world.size} crashed ({what}). Ending the job; the other ranks "
            "stop at their next collective (torchrun also stops them).")


__all__ = ["World", "CollectiveError", "session", "current", "env_world", "resolve_backend", "LAUNCH_VARS",
           "BACKENDS"]
