"""Everything around a meta-training step that is not the step: stop signals, the rollback of an abandoned
iteration's random draws, the ranks' agreement to stop together, divergence and a full disk.

One :class:`StepGuard` per fit holds them, so that :func:`mamlkit.loop.train._fit_loop` reads as the loop it is
(sample, step, log, validate, save). The guard knows the trainer only by its fields (``run_dir``, ``step``,
``cfg``, ``learner``, ``optimizer``, ``rng_state``, ``resume_dir``) and writes checkpoints through the function it
is given, so it imports nothing of the trainer.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mamlkit import checkpoint, runfolder
from mamlkit.base.errors import Diverged
from mamlkit.loop import distributed


def _model_tensors(trainer: Any) -> Iterator[torch.Tensor]:
    """A supervised trainer's meta-parameters, buffers and optimiser state."""
    yield from trainer.learner.meta_parameters().values()
    yield from trainer.learner.model.buffers()
    yield from (v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def _step_sizes(cfg: Any) -> tuple[str, str]:
    """A supervised run's likely cause of divergence, and what to do."""
    return (f"a step size too large for this model (--meta-lr {cfg.meta_lr:g}, --inner-lr {cfg.inner_lr:g})",
            "Start a new run with a smaller --meta-lr or --inner-lr (--overwrite replaces this one).")


def _rng_undo(trainer: Any) -> Callable[[], None]:
    """The training RNG's state now, to be restored: an abandoned iteration's random draws are undone."""
    state = torch.get_rng_state()
    return lambda: torch.set_rng_state(state)


class StepGuard:
    """The guards of one fit of ``trainer`` on ``world``. ``write(trainer, path)`` writes a checkpoint;
    ``resume()`` is the command that continues the run (named in the messages of a stop or a full disk).

    What differs between trainers comes as functions: ``tensors(trainer)``, what must be finite before a
    checkpoint is written (default: a supervised trainer's parameters, buffers and optimiser state);
    ``cause(cfg)``, the likely cause of a divergence and what to do; ``undo(trainer)``, called as an iteration
    begins, returns what undoes that iteration if it is abandoned (default: the training RNG's draws)."""

    def __init__(self, trainer: Any, world: distributed.World, write: Callable[[Any, Path], None],
                 resume: Callable[[], str], *, tensors: Callable[[Any], Iterable[torch.Tensor]] = _model_tensors,
                 cause: Callable[[Any], tuple[str, str]] = _step_sizes,
                 undo: Callable[[Any], Callable[[], None]] = _rng_undo):
        self.trainer, self.world, self._write, self._resume = trainer, world, write, resume
        self._tensors, self._cause, self._undo = tensors, cause, undo
        self.signals = runfolder.current()
        # One rank alone must never leave: the others would wait in the next collective for ever (or fail).
        # With several ranks `fit` holds every stop signal, so the deferred blocks never raise and every rank
        # stops after the step at whose gradient reduction some rank reported one (`agreed`); a single
        # process stops as soon as an update allows.
        self.several = world.active and world.size > 1
        self.agreed = False
        # the step of the checkpoint on disk (None: none yet), named when the run stops on divergence
        self.saved = trainer.step if (trainer.run_dir / "checkpoint.safetensors").exists() else None
        self._begun: tuple[int | None, Callable[[], None] | None] = (None, None)

    @property
    def stopping(self) -> bool:
        """Whether a stop signal reached this process (the ranks learn of it with the next reduction)."""
        return self.signals.received is not None

    def hold(self) -> contextlib.AbstractContextManager:
        """A block a stop signal does not cut in two (it takes effect when the block ends)."""
        return self.signals.deferred()

    def begin(self) -> None:
        """Start an iteration: the ranks leave together at the step they agreed on, and the training RNG's
        state is kept, to undo this iteration's draws if it is abandoned."""
        if self.several and self.agreed:
            raise runfolder.Stopped(self.signals.received or signal.SIGTERM)
        self._begun = (self.trainer.step, self._undo(self.trainer))

    def agree(self) -> None:
        """After an iteration whose collectives carry no stop flag (meta-RL's), the ranks agree here whether a
        stop signal reached any of them, and then stop together."""
        if self.several and self.world.any_rank(self.stopping):
            raise runfolder.Stopped(self.signals.received or signal.SIGTERM)

    def gradient(self) -> contextlib.AbstractContextManager:
        """The meta-gradient: a signal is never raised inside torch's own code (a torch function mode's
        bookkeeping cut in two leaves its stack broken); one that lands there takes effect after it."""
        return self.signals.deferred()

    def check_loss(self, loss: float) -> None:
        """Stop a run whose meta-training loss is not finite (a float already: no extra sync; every rank sees
        the same). A stop signal before the update abandons the iteration: only gradients were touched."""
        if not math.isfinite(loss):
            raise self.diverged(self.trainer.step + 1, f"its meta-training loss is {loss}")

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """From the update on, the iteration is finished, logged and checkpointed before a stop signal takes
        effect; a full disk on the way is a message naming the intact checkpoint."""
        with self.signals.deferred(), self.disk_full():
            yield

    def check_finite(self) -> None:
        """Raise :class:`Diverged` if a meta-parameter, buffer or optimiser tensor is NaN or infinite: one fused
        check, made before a checkpoint is written or the model validated, not at every step (the loss is)."""
        t = self.trainer
        if not checkpoint.all_finite(x.detach() for x in self._tensors(t) if x.is_floating_point()):
            raise self.diverged(t.step, "its parameters or optimiser state hold NaN or inf")

    def diverged(self, step: int, what: str) -> Diverged:
        """The error that stops a diverged run: the step, what is not finite, the likely cause, what is kept."""
        cfg, run = self.trainer.cfg, self.trainer.run_dir
        kept = (f"The checkpoint of step {self.saved} in {run} is kept as it was (finite)." if self.saved is not None
                else "No checkpoint had been written, so none is kept.")
        cause, fix = self._cause(cfg)
        return Diverged(f"training diverged at step {step}: {what}. Likely cause: {cause}, or values beyond the "
                        f"range of {cfg.dtype} (--dtype float64 holds more). Training stopped. {kept} {fix}")

    def save(self) -> None:
        """Write the checkpoint of the step reached; a good checkpoint is never replaced by one of a diverged run."""
        self.check_finite()
        self._write(self.trainer, self.trainer.run_dir / "checkpoint.safetensors")
        self.saved = self.trainer.step

    @contextlib.contextmanager
    def disk_full(self) -> Iterator[None]:
        """Turn an out-of-space write into :class:`~mamlkit.runfolder.DiskFull`, naming the last good checkpoint."""
        try:
            yield
        except Exception as e:  # OSError, or safetensors' error that wraps one
            if not runfolder.no_space(e):
                raise
            err = checkpoint.os_error_of(e)
            run, resume = self.trainer.run_dir, self._resume()
            kept = (f"The checkpoint of step {self.saved} in {run} is intact: free some space, then resume with "
                    f"`{resume}`." if self.saved is not None else
                    f"The run's checkpoint is intact: free some space, then resume with `{resume}`."
                    if self.trainer.resume_dir else "No checkpoint had been written yet, so the folder holds no run: "
                    "free some space and run the same command again.")
            raise runfolder.DiskFull(f"no space left on the device while writing the run in {run} at step "
                                     f"{self.trainer.step} ({err.strerror}: {err.filename or 'a log'}); training "
                                     "stopped. " + kept) from None

    @contextlib.contextmanager
    def stops(self, bar: Any) -> Iterator[None]:
        """The loop's way out on a stop, or another rank's crash (the one collective precedes the update): every
        finished step is kept. Parameters and optimiser state are the same on every rank, so rank 0's are the
        job's; an iteration stopped before its update is abandoned and its random draws undone."""
        try:
            yield
        except (KeyboardInterrupt, distributed.CollectiveError) as e:
            if self._begun[0] == self.trainer.step:
                self._begun[1]()
            if self.world.is_main:
                self._save_on_stop(e, bar)
            raise

    def _save_on_stop(self, e: BaseException, bar: Any) -> None:
        with self.disk_full():
            self.save()
        step = self.trainer.step
        where = f"{self.trainer.run_dir / 'checkpoint.safetensors'}. Resume with `{self._resume()}`"
        if isinstance(e, distributed.CollectiveError):
            print(f"mamlkit: checkpoint of step {step} saved to {where}", file=sys.stderr, flush=True)
        else:
            name = e.args[0] if isinstance(e, runfolder.Stopped) else "Ctrl-C"
            bar.write(f"mamlkit: stopped by {name} at step {step}; checkpoint saved to {where}")


def one_stop_for_all_ranks(world: distributed.World) -> contextlib.AbstractContextManager:
    """With several ranks, a stop signal is only recorded, wherever in the fit it lands (sampling a
    batch as much as in the meta-gradient): a rank that left alone would make the others' next
    collective fail. The ranks stop together at the step they agree on (:meth:`StepGuard.begin`,
    :meth:`StepGuard.agree`)."""
    several = world.active and world.size > 1
    return runfolder.current().held() if several else contextlib.nullcontext()


def rank_lock(run_dir: Path, world: distributed.World) -> contextlib.AbstractContextManager:
    """Rank 0's lock on the run folder, unless this process holds it already: a run's recipe
    (:mod:`mamlkit.loop.run`) takes it once for training, baseline and report."""
    take = world.is_main and not runfolder.holds(run_dir)
    return runfolder.lock(run_dir) if take else contextlib.nullcontext()
