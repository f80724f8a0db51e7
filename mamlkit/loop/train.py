"""The meta-training loop, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mamlkit import checkpoint, config, runfolder
from mamlkit.algorithms import MetaLearner
from mamlkit.assemble import DTYPES, assemble
from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.base.metrics import MetricsLog, mean_ci
from mamlkit.exec import threads, tuning
from mamlkit.loop import distributed
from mamlkit.loop.schedules import meta_lr_at, meta_optimizer
from mamlkit.models import USER_MODELS, check_model_memory, resolve_spec
from mamlkit.tasks import get_family, task_generator


@dataclass
class Trainer:
    """A model, its meta-learner and meta-optimiser, and where the run writes."""

    cfg: config.TrainConfig
    learner: MetaLearner
    optimizer: torch.optim.Optimizer
    run_dir: Path
    step: int = 0
    # The training's own torch RNG stream (dropout in a user's model): seeded from cfg.seed at step 0,
    # carried in checkpoints, so a resumed run draws exactly what an uninterrupted one would.
    rng_state: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype]


def model_spec(cfg: config.TrainConfig) -> dict[str, Any]:
    """The spec of the model ``cfg`` trains: the task family's, or the user's ``--model``."""
    return resolve_spec(cfg.model, cfg.model_kwargs, get_family(cfg.task).model_spec(cfg))


def _user_spec(state: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's record of a user's model (rebuilt as recorded), or None for the family's own."""
    spec = state.get("model_spec")
    return spec if spec and spec.get("name") in USER_MODELS else None


def build(cfg: config.TrainConfig, state: dict[str, torch.Tensor] | None = None,
          spec: dict[str, Any] | None = None) -> tuple[MetaLearner, dict]:
    """Build the model and learner of ``cfg`` (or of ``spec``, a checkpoint's record of its model); load
    meta-parameters from ``state`` if given. Returns ``(learner, spec)``; see :func:`mamlkit.assemble.assemble`."""
    spec = spec or model_spec(cfg)
    check_model_memory(spec, DTYPES[cfg.dtype])
    return assemble(cfg, spec, state), spec


def save_checkpoint(trainer: Trainer, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write meta-parameters, buffers, optimiser and RNG state, and the resolved config, atomically."""
    learner = trainer.learner
    tensors = {f"meta/{k}": v for k, v in learner.meta_parameters().items()}
    tensors |= {f"buffer/{k}": v for k, v in learner.model.named_buffers()}
    opt_tensors, opt_meta = checkpoint.optimizer_tensors(trainer.optimizer.state_dict())
    tensors |= opt_tensors
    tensors["rng/torch"] = trainer.rng_state if trainer.rng_state is not None else checkpoint.rng_tensor()
    state = {"config": trainer.cfg.to_dict(), "model_spec": model_spec(trainer.cfg),
             "algo": learner.name, "kind": learner.kind, "step": trainer.step, "optimizer": opt_meta,
             "strategy": learner.executor.strategy.name, **(extra or {})}
    checkpoint.save(path, tensors, state)


def load_trainer(path: str | Path, run_dir: Path | None = None, resume: bool = True) -> Trainer:
    """Rebuild a :class:`Trainer` from a checkpoint, ready to continue exactly where it stopped.

    With ``resume=False`` (evaluation) the optimiser, step and RNG state are not needed: a shipped
    model (``mamlkit/assets``), which holds none of them, loads too.
    """
    tensors, state = checkpoint.load(path)
    cfg = checkpoint.config_of(state, path)
    learner, _ = build(cfg, tensors, _user_spec(state))
    optimizer = meta_optimizer(cfg, learner.meta_parameters().values())
    rng = None
    if resume:
        lacking = [k for k in ("optimizer", "step") if k not in state] + \
            (["rng/torch"] if "rng/torch" not in tensors else [])
        if lacking:
            raise checkpoint.CheckpointError(f"{path} holds no {', '.join(lacking)}: it is a model to evaluate or "
                                             "adapt (`mamlkit eval`, `mamlkit adapt`), not a run to resume")
        checkpoint.load_optimizer(optimizer, tensors, state, path)
        rng = checkpoint.check_rng(tensors["rng/torch"], path)
    learner.executor.resume(state.get("strategy"))  # what an auto run measured and used: the same numbers
    ckpt = Path(path)
    run_dir = run_dir or (ckpt if ckpt.is_dir() else ckpt.parent)
    step = state.get("step", 0)
    if not isinstance(step, int) or step < 0:
        raise checkpoint.CheckpointError(f"{path}: its step is {step!r}, not a count of iterations")
    return Trainer(cfg, learner, optimizer, run_dir, step=step, rng_state=rng)


def new_trainer(cfg: config.TrainConfig, run_dir: Path) -> Trainer:
    learner, _ = build(cfg)
    optimizer = meta_optimizer(cfg, learner.meta_parameters().values())
    return Trainer(cfg, learner, optimizer, run_dir)


def validate(trainer: Trainer, split: str = "val", num_tasks: int | None = None) -> dict[str, float]:
    """Mean query loss (and accuracy) after the test-time inner steps on fixed ``split`` tasks."""
    cfg = trainer.cfg
    dist = get_family(cfg.task).build(cfg, split)
    batch = dist.sample(num_tasks or cfg.val_tasks, task_generator(cfg.seed, split, 0))
    losses, accs = trainer.learner.adapted_losses(batch.to(cfg.device, trainer.dtype), cfg.eval_inner_steps)
    out = {"loss": mean_ci(losses[:, -1])[0]}
    if trainer.learner.kind == "classification":
        out["acc"] = mean_ci(accs[:, -1])[0]
    return out


TUNE_TASKS = 100  # validation tasks that pick a step size when the run validates on none


def tune_inner_lr(trainer: Trainer, rates: tuple[float, ...]) -> tuple[Trainer, dict[float, float]]:
    """Pick the test-time step size of a trained model: the rate of ``rates`` whose validation query loss
    (:func:`validate`: ``val_tasks`` fixed ``val`` tasks, or TUNE_TASKS without validation, and
    ``eval_inner_steps`` steps) is lowest, ties to the smaller rate.

    The paper fine-tunes its pretrained baseline "with a tuned step size" (Finn et al. 2017, Fig. 2). The
    chosen rate becomes the run's ``inner_lr`` and ``baseline_lrs`` is emptied, in the config and in the
    checkpoint (rewritten atomically), so ``mamlkit eval`` uses that rate and a second call does nothing.
    Returns the trainer and the validation loss of every rate (``inf`` where fine-tuning diverged).
    """
    if not rates:
        return trainer, {}
    state = {f"meta/{k}": v.detach() for k, v in trainer.learner.meta_parameters().items()}
    state |= {f"buffer/{k}": v for k, v in trainer.learner.model.named_buffers()}
    strategy = trainer.learner.executor.strategy.name
    losses, learners = {}, {}
    for rate in rates:
        cfg = trainer.cfg.replace(inner_lr=rate, baseline_lrs=())
        learners[rate] = assemble(cfg, model_spec(cfg), state)
        learners[rate].executor.resume(strategy)
        loss = validate(Trainer(cfg, learners[rate], trainer.optimizer, trainer.run_dir),
                        num_tasks=cfg.val_tasks or TUNE_TASKS)["loss"]
        losses[rate] = loss if math.isfinite(loss) else math.inf
    best = min(rates, key=lambda r: (losses[r], r))
    trainer.cfg, trainer.learner = trainer.cfg.replace(inner_lr=best, baseline_lrs=()), learners[best]
    tried = {f"{r:g}": v if math.isfinite(v) else None for r, v in losses.items()}  # strict JSON
    save_checkpoint(trainer, trainer.run_dir / "checkpoint.safetensors", {"tuned_inner_lr": tried})
    checkpoint.atomic_write_text(trainer.run_dir / "config.json", json.dumps(trainer.cfg.to_dict(), indent=2))
    return trainer, losses


def fit(trainer: Trainer, stop_at: int | None = None) -> Trainer:
    """Meta-train from ``trainer.step`` to ``cfg.iterations`` (or ``stop_at``), checkpointing on the way.

    Task batch ``s`` is drawn from ``(seed, "train", s)`` alone, so a resumed run sees exactly the
    tasks an uninterrupted one would. Launched by torchrun, the ``meta_batch`` tasks are split across
    the ranks and their gradients summed (:mod:`mamlkit.loop.distributed`); rank 0 alone logs, validates and
    writes checkpoints, and the last checkpoint is on disk when ``fit`` returns on any rank.
    """
    # --threads 0: one intra-op thread and whole tasks over the cores, which holds up when another
    # process takes a core (mamlkit.exec.threads)
    threads.apply(threads.choose(trainer.cfg.threads, trainer.cfg.device))
    if trainer.cfg.tune_malloc:
        tuning.tune_malloc()
    with distributed.session(trainer.cfg) as world, _one_stop_for_all_ranks(world), \
            (runfolder.lock(trainer.run_dir) if world.is_main else contextlib.nullcontext()), \
            torch.random.fork_rng(devices=[]):
        # the training's RNG stream is its own: seeded from cfg.seed, or the checkpoint's, and the caller's
        # global RNG is left as it was
        if trainer.rng_state is None:
            torch.manual_seed(trainer.cfg.seed)
        else:
            torch.set_rng_state(trainer.rng_state)
        world.broadcast_(trainer.learner)  # every rank starts from rank 0's meta-parameters
        try:
            _fit_loop(trainer, stop_at, world)
        finally:
            trainer.rng_state = torch.get_rng_state()
        world.barrier()
    return trainer


def _one_stop_for_all_ranks(world: distributed.World) -> contextlib.AbstractContextManager:
    """With several ranks, a stop signal is only recorded, wherever in the fit it lands (sampling a
    batch as much as in the meta-gradient): a rank that left alone would make the others' next
    collective fail. The ranks stop together at the step they agree on (:func:`_fit_loop`)."""
    several = world.active and world.size > 1
    return runfolder.current().held() if several else contextlib.nullcontext()


def _fit_loop(trainer: Trainer, stop_at: int | None, world: distributed.World) -> None:
    cfg, learner, opt, main = trainer.cfg, trainer.learner, trainer.optimizer, world.is_main
    saved = [trainer.step if (trainer.run_dir / "checkpoint.safetensors").exists() else None]
    if main:
        with _stop_if_disk_full(trainer, saved):
            runfolder.prepare(trainer.run_dir, trainer.step)
            checkpoint.atomic_write_text(trainer.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    metrics = MetricsLog(trainer.run_dir, tensorboard=cfg.tensorboard, enabled=main)
    signals = runfolder.current()
    # One rank alone must never leave: the others would wait in the next collective for ever (or fail).
    # With several ranks `fit` holds every stop signal (_one_stop_for_all_ranks), so these deferred
    # blocks never raise and every rank stops after the step at whose gradient reduction some rank
    # reported one; a single process stops as soon as an update allows.
    several = world.active and world.size > 1
    hold = signals.deferred
    tasks = get_family(cfg.task).build(cfg, "train")
    end = min(stop_at or cfg.iterations, cfg.iterations)
    bar = tqdm(total=end, initial=trainer.step, disable=not (cfg.progress and main),
               desc=f"{cfg.run_name or cfg.task}", dynamic_ncols=True, unit="it")
    if not learner.executor.settled or trainer.step == 0:  # measure memory (and, with auto, speed) before launching
        first = world.train_batch(tasks, cfg.seed, trainer.step, cfg.meta_batch).to(cfg.device, trainer.dtype)
        if model_spec(cfg)["name"] in USER_MODELS:
            check_model_output(learner.model, first, learner.kind, cfg.model)
        with hold(), torch.random.fork_rng(devices=[]):  # no draws from the training's stream
            learner.executor.settle(learner, first, iterations=end - trainer.step,
                                    say=bar.write if main else lambda msg: None)
    if main:
        bar.write(f"mamlkit: {learner.name} on {cfg.task}, strategy {learner.executor.strategy.name}, "
                  f"{world.size} rank(s), run folder {trainer.run_dir}")
    start_time, window, begun, agreed = time.perf_counter(), [], (None, None), False
    window_start = start_time
    try:
        while trainer.step < end:
            if several and agreed:
                raise runfolder.Stopped(signals.received or signal.SIGTERM)
            begun = (trainer.step, torch.get_rng_state())  # to roll the RNG back if this iteration is abandoned
            batch = world.train_batch(tasks, cfg.seed, trainer.step, cfg.meta_batch)  # this rank's share
            opt.zero_grad(set_to_none=True)
            learner.set_step(trainer.step)  # step-dependent pieces (MAML++ annealing)
            for group in opt.param_groups:  # a pure function of the step: resume-exact
                group["lr"] = meta_lr_at(cfg, trainer.step)
            # A signal is never raised inside torch's own code (a torch function mode's bookkeeping cut in
            # two leaves its stack broken): one during the meta-gradient takes effect after it.
            with hold():
                stats, agreed = world.meta_backward(learner, batch.to(cfg.device, trainer.dtype), cfg.meta_batch,
                                                    stopping=signals.received is not None)
            # A stop signal before here abandons the iteration (only gradients were touched); from the
            # update on, the iteration is finished, logged and checkpointed before the signal takes effect.
            with hold(), _stop_if_disk_full(trainer, saved):
                opt.step()
                trainer.step += 1
                window.append(stats)
                if main and (trainer.step % cfg.log_every == 0 or trainer.step == end):
                    now = time.perf_counter()
                    elapsed, window_time, window_start = now - start_time, now - window_start, now
                    row = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    row |= {"tasks_per_s": len(window) * cfg.meta_batch / window_time,
                            "elapsed_s": elapsed}
                    metrics.log(trainer.step, "train", row)
                    # the training batch's query metrics after the training's inner steps (not validation's)
                    inner = getattr(learner, "inner_steps", cfg.inner_steps)
                    bar.set_postfix({f"train {k} after {inner} step{'s' * (inner != 1)}": f"{v:.4g}"
                                     for k, v in row.items() if k in ("loss", "acc")})
                    window = []
                if main and cfg.val_tasks and (trainer.step % cfg.val_every == 0 or trainer.step == end):
                    with torch.random.fork_rng(devices=[]):  # validating leaves the training's stream alone
                        val = validate(trainer)
                    metrics.log(trainer.step, "val", val)
                    bar.write(f"step {trainer.step}: validation query {' and '.join(val)} after "
                              f"{cfg.eval_inner_steps} inner steps, {cfg.val_tasks} tasks: "
                              + ", ".join(f"{v:.4g}" for v in val.values()))
                if main and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == end):
                    _save(trainer, saved)
            bar.update(1)
    except (KeyboardInterrupt, distributed.CollectiveError) as e:
        # A stop, or another rank's crash (the one collective here precedes the update): every finished
        # step is kept. Parameters and optimiser state are the same on every rank, so rank 0's are the job's.
        if begun[0] == trainer.step:  # stopped before the update: the iteration is abandoned, its draws undone
            torch.set_rng_state(begun[1])
        if main:
            with _stop_if_disk_full(trainer, saved):
                _save(trainer, saved)
            where = (f"{trainer.run_dir / 'checkpoint.safetensors'}. Resume with "
                     f"`mamlkit train --resume {trainer.run_dir}`")
            if isinstance(e, distributed.CollectiveError):
                print(f"mamlkit: checkpoint of step {trainer.step} saved to {where}", file=sys.stderr, flush=True)
            else:
                name = e.args[0] if isinstance(e, runfolder.Stopped) else "Ctrl-C"
                bar.write(f"mamlkit: stopped by {name} at step {trainer.step}; checkpoint saved to {where}")
        raise
    finally:
        bar.close()
        with contextlib.suppress(OSError):  # a full disk is reported by the write that hit it
            metrics.close()


def _save(trainer: Trainer, saved: list) -> None:
    trainer.rng_state = torch.get_rng_state()  # the training's stream, as it stands after this step
    save_checkpoint(trainer, trainer.run_dir / "checkpoint.safetensors")
    saved[0] = trainer.step


def check_model_output(model: torch.nn.Module, batch: TaskBatch, kind: str, name: str) -> None:
    """Refuse a user's model whose predictions do not fit the task's targets: ``[N, *y_shape]`` for
    regression, logits ``[N, classes]`` for classification (on one task's support set)."""
    x, y = batch.support_x[0], batch.support_y[0]
    try:
        with torch.no_grad():  # on copies of the buffers: a BatchNorm's running statistics stay as they are
            buffers = {k: b.clone() for k, b in model.named_buffers()}
            out = torch.func.functional_call(model, buffers, (x,), strict=False)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported as the contract
        raise UserError(f"--model {name} fails on this task's inputs of shape {list(x.shape)} "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(out, torch.Tensor):
        raise UserError(f"--model {name} returns a {type(out).__name__}; it must return a tensor of predictions")
    if kind == "classification":
        ok, want = out.dim() == 2 and out.shape[0] == len(y) and out.shape[1] > int(y.max()), \
            f"logits [{len(y)}, >= {int(y.max()) + 1}]"
    else:
        ok, want = out.shape == y.shape, f"{list(y.shape)}"
    if not ok:
        raise UserError(f"--model {name} maps inputs {list(x.shape)} to {list(out.shape)}; this task needs {want}")


@contextlib.contextmanager
def _stop_if_disk_full(trainer: Trainer, saved: list):
    """Turn an out-of-space write into :class:`~mamlkit.runfolder.DiskFull`, naming the last good checkpoint."""
    try:
        yield
    except OSError as e:
        if not runfolder.no_space(e):
            raise
        run = trainer.run_dir
        kept = (f"The checkpoint of step {saved[0]} in {run} is intact: free some space, then resume with "
                f"`mamlkit train --resume {run}`." if saved[0] is not None else
                "No checkpoint had been written yet: free some space and start the run again (with --overwrite).")
        raise runfolder.DiskFull(f"no space left on the device while writing the run in {run} at step "
                                 f"{trainer.step} ({e.strerror}: {e.filename or 'a log'}); training stopped. "
                                 + kept) from None


def run_dir_for(cfg: config.TrainConfig, overwrite: bool = False) -> Path:
    """The run folder of a fresh run; one that already holds a run (even a killed one, with only logs) is
    refused unless ``overwrite``, so two runs never mix their metrics."""
    name = cfg.run_name or f"{cfg.preset or cfg.task}-{cfg.algo}"
    path = Path(cfg.out_dir) / name
    if runfolder.holds_run(path) and not overwrite:
        raise UserError(f"run folder {path} already holds a run. Resume it with `mamlkit train --resume "
                        f"{path}`, pick another folder with --run-name or --out-dir, or pass --overwrite to "
                        "replace it.")
    return path
