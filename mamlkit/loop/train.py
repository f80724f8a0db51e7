"""The meta-training loop, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mamlkit import checkpoint, config, runfolder
from mamlkit.algorithms import MetaLearner
from mamlkit.assemble import DTYPES, assemble, config_of
from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.base.metrics import MetricsLog, add_to_window, is_window, mean_ci, window_row
from mamlkit.exec import threads, tuning
from mamlkit.loop import distributed
from mamlkit.loop.guard import StepGuard, one_stop_for_all_ranks, rank_lock
from mamlkit.loop.schedules import meta_lr_at, meta_optimizer
from mamlkit.models import (
    USER_MODELS,
    Workload,
    approve_model_code,
    check_model_memory,
    example_shape,
    named_factory,
    resolve_spec,
)
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
    # The folder whose `mamlkit train --resume` continues this training (None: run_dir itself): a run's
    # baseline, trained in RUN/pretrained, is resumed through its run, which then writes the report too.
    resume_dir: Path | None = None

    # The running sums of the log window in progress ({"steps": n, "sums": {metric: sum}}), carried in
    # checkpoints, so the first row after a resume averages the same steps as an uninterrupted run's.
    log_window: dict[str, Any] = field(default_factory=dict)
    # What the model takes (input_record), recorded in checkpoints for `mamlkit adapt`; None: not read yet.
    input: dict[str, Any] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype]


def resume_command(trainer: Trainer) -> str:
    """The command that continues ``trainer``'s training from its checkpoint, and the rest of its run."""
    return resume_command_for(trainer.resume_dir or trainer.run_dir, trainer.cfg.model)


def resume_command_for(run_dir: Path, model: str) -> str:
    """``mamlkit train --resume RUN``, naming the run's model factory (``model``, its config's ``--model``)
    again when it has one: resuming imports it only when the user names it (docs/reliability.md)."""
    factory = named_factory(model) if isinstance(model, str) else None
    return f"mamlkit train --resume {run_dir}" + (f" --model {factory}" if factory else "")


def check_split(cfg: config.TrainConfig, split: str) -> None:
    """Build ``split``'s tasks and draw one, as validation and evaluation will: a split that cannot give
    ``cfg``'s tasks (too few classes, data missing) fails before the first training step, not after training."""
    get_family(cfg.task).build(cfg, split).sample(1, task_generator(cfg.seed, split, 0))


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
    check_model_memory(spec, DTYPES[cfg.dtype], *workloads(cfg, spec))  # refused before anything is allocated
    return assemble(cfg, spec, state), spec


def workloads(cfg: config.TrainConfig, spec: dict[str, Any]) -> tuple[Workload, Workload]:
    """What meta-training and evaluation hold besides the model (:func:`mamlkit.models.check_model_memory`):
    a meta-batch's data and one task's graph through the inner steps; the evaluation's fixed tasks and one
    task's adapted parameters after each evaluated step. Under vmap (or compile) tasks run together."""
    family = get_family(cfg.task)
    example = example_shape(spec, family.input_spec(cfg) if family.input_spec is not None else None)
    ways = cfg.n_way if cfg.loss == "cross_entropy" else 1
    shots = max(cfg.eval_shots) if cfg.loss != "cross_entropy" else cfg.k_shot
    eval_examples = ways * (cfg.k_shot + cfg.k_query) if ways > 1 else shots + (cfg.eval_query or shots)
    together = cfg.strategy in ("vmap", "compile")
    train = Workload(example, ways * (cfg.k_shot + cfg.k_query), tasks_held=cfg.meta_batch,
                     tasks_at_once=(cfg.chunk_size or cfg.meta_batch) if together else 1, steps=cfg.inner_steps,
                     training=True, shrink="--meta-batch, --k-shot, --k-query, --inner-steps")
    held = max(cfg.eval_tasks, cfg.val_tasks)
    evaluation = Workload(example, eval_examples, tasks_held=held,
                          tasks_at_once=min(cfg.chunk_size or 100, held) if together else 1,
                          steps=max((*cfg.eval_steps, cfg.eval_inner_steps)), training=False,
                          shrink="--eval-tasks, --val-tasks, --eval-steps, --test-inner-steps")
    return train, evaluation


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
             "strategy": learner.executor.strategy.name, "log_window": trainer.log_window,
             "input": trainer.input or input_record(trainer.cfg, sample=False), **(extra or {})}
    checkpoint.save(path, tensors, state)


def input_record(cfg: config.TrainConfig, tasks: Any = None, sample: bool = True) -> dict[str, Any] | None:
    """What the model of ``cfg`` takes, recorded in its checkpoints so that ``mamlkit adapt`` reads inputs
    for it without guessing from the model's weights: the family's raw-input spec (image, text, table or
    vector, :data:`mamlkit.tasks.INPUT_TYPES`) with, from one training task of ``tasks`` (default: the
    family's train split), ``shape`` (one example's), ``features`` (its width, for one-dimensional
    examples), ``dtype`` and ``tokens`` (integer ids, not values). None for a family that declares no raw
    input format (tensors only), which ``mamlkit adapt`` refuses. ``sample=False`` (a checkpoint written
    without training, whose data need not be at hand): the family's spec alone."""
    family = get_family(cfg.task)
    if family.input_spec is None:
        return None
    spec = dict(family.input_spec(cfg))
    if tasks is None and not sample:
        return spec
    tasks = tasks if tasks is not None else family.build(cfg, "train")
    x = tasks.sample(1, task_generator(cfg.seed, "train", 0)).support_x[0]  # [K, *example]
    example = list(x.shape[1:])
    return {**spec, "shape": example, "features": example[0] if len(example) == 1 else None,
            "dtype": cfg.dtype if x.is_floating_point() else str(x.dtype).removeprefix("torch."),
            "tokens": not (x.is_floating_point() or x.is_complex())}


def load_trainer(path: str | Path, run_dir: Path | None = None, resume: bool = True, *, model: str | None = None,
                 trust_model_code: bool = False) -> Trainer:
    """Rebuild a :class:`Trainer` from a checkpoint, ready to continue exactly where it stopped.

    With ``resume=False`` (evaluation) the optimiser, step and RNG state are not needed: a shipped
    model (``mamlkit/assets``), which holds none of them, loads too. A checkpoint of a user's model factory
    is rebuilt only if the caller names that factory (``model``) or trusts the file's code
    (``trust_model_code``): see :func:`mamlkit.models.approve_model_code`.
    """
    tensors, state = checkpoint.load(path)
    # Decided before the config is read or anything built: both records of the model may name code.
    stored = state.get("config")
    approve_model_code([state.get("model_spec"), stored.get("model") if isinstance(stored, dict) else None],
                       f"checkpoint {path}", model=model, trust_model_code=trust_model_code)
    cfg = config_of(state, path)
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
    return Trainer(cfg, learner, optimizer, run_dir, step=step, rng_state=rng,
                   log_window=_log_window_of(state, path) if resume else {})


def new_trainer(cfg: config.TrainConfig, run_dir: Path) -> Trainer:
    learner, _ = build(cfg)
    optimizer = meta_optimizer(cfg, learner.meta_parameters().values())
    return Trainer(cfg, learner, optimizer, run_dir)


def validate(trainer: Trainer, split: str = "val", num_tasks: int | None = None) -> dict[str, float]:
    """Mean query loss (and accuracy) after the test-time inner steps on fixed ``split`` tasks."""
    cfg = trainer.cfg
    dist = get_family(cfg.task).build(cfg, split)
    batch = dist.sample(num_tasks or cfg.val_tasks, task_generator(cfg.seed, split, 0))
    # a stop signal ends validation at the next inner step, even inside the loop's deferred block: it
    # changes nothing the checkpoint holds, and with many steps it could run far longer than an iteration
    with runfolder.current().interruptible():
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
    plan = threads.choose(trainer.cfg.threads, trainer.cfg.device)
    threads.apply(plan)
    if trainer.cfg.tune_malloc:
        tuning.tune_malloc()
    # planned: the run's plan holds over the executor's own (built from the config before a resume changed it)
    with threads.planned(plan), distributed.session(trainer.cfg) as world, one_stop_for_all_ranks(world), \
            rank_lock(trainer.run_dir, world), \
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


def _fit_loop(trainer: Trainer, stop_at: int | None, world: distributed.World) -> None:
    cfg, learner, opt, main = trainer.cfg, trainer.learner, trainer.optimizer, world.is_main
    # stop signals, the rollback of an abandoned iteration, the ranks' stop, divergence and a full disk
    guard = StepGuard(trainer, world, _save_with_rng, lambda: resume_command(trainer))
    metrics = _open_run(trainer, world, guard)
    end = min(stop_at or cfg.iterations, cfg.iterations)
    bar = tqdm(total=end, initial=trainer.step, disable=not (cfg.progress and main),
               desc=f"{cfg.run_name or cfg.task}", dynamic_ncols=True, unit="it")
    tasks = _ready(trainer, world, end, bar, guard.hold)
    start_time = time.perf_counter()
    timed = (start_time, trainer.step)  # the log window's time and step in this process (for tasks_per_s)
    with _closing(bar, metrics), guard.stops(bar):
        while trainer.step < end:
            guard.begin()
            batch = world.train_batch(tasks, cfg.seed, trainer.step, cfg.meta_batch)  # this rank's share
            opt.zero_grad(set_to_none=True)
            learner.set_step(trainer.step)  # step-dependent pieces (MAML++ annealing)
            for group in opt.param_groups:  # a pure function of the step: resume-exact
                group["lr"] = meta_lr_at(cfg, trainer.step)
            with guard.gradient():
                stats, guard.agreed = world.backward_and_reduce(learner, batch.to(cfg.device, trainer.dtype),
                                                                  cfg.meta_batch, stopping=guard.stopping)
            guard.check_loss(stats["loss"])
            with guard.update():
                opt.step()
                trainer.step += 1
                add_to_window(trainer.log_window, stats)
                # a row at the run's end, not at a `stop_at` (the run goes on: its window is checkpointed)
                if main and (trainer.step % cfg.log_every == 0 or trainer.step == cfg.iterations):
                    timed = _log_train_row(trainer, metrics, bar, timed, start_time)
                save = trainer.step % cfg.checkpoint_every == 0 or trainer.step == end
                val = cfg.val_tasks and (trainer.step % cfg.val_every == 0 or trainer.step == end)
                if save or val:  # nothing non-finite is validated or saved; on every rank, so all stop
                    guard.check_finite()
                if main and val:
                    _validate_row(trainer, metrics, bar)
                if main and save:
                    guard.save()
            bar.update(1)


def _save_with_rng(trainer: Trainer, path: Path) -> None:
    """The guard's checkpoint: the training's RNG stream as it stands after this step, with the rest."""
    trainer.rng_state = torch.get_rng_state()
    save_checkpoint(trainer, path)


def _open_run(trainer: Trainer, world: distributed.World, guard: StepGuard) -> MetricsLog:
    """Ready the run folder to continue from ``trainer.step`` (rank 0: leftovers removed, logs cut back, the
    run's files recorded in its manifest before they are written, its config written) and open its logs."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    with guard.disk_full():
        if world.is_main:
            runfolder.record(run_dir, TRAINER_FILES + ("tensorboard/",) * cfg.tensorboard)
            runfolder.prepare(run_dir, trainer.step)
            checkpoint.atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        return MetricsLog(run_dir, tensorboard=cfg.tensorboard, enabled=world.is_main)  # TensorBoard writes


# What the trainer writes into its run folder (TensorBoard's events too, where the run keeps them).
TRAINER_FILES = ("checkpoint.safetensors", "config.json", "metrics.jsonl", "metrics.csv")


@contextlib.contextmanager
def _closing(bar: Any, metrics: MetricsLog) -> Iterator[None]:
    """Close the progress bar and the logs however the loop ends."""
    try:
        yield
    finally:
        bar.close()
        with contextlib.suppress(OSError):  # a full disk is reported by the write that hit it
            metrics.close()


def _validate_row(trainer: Trainer, metrics: MetricsLog, bar: Any) -> None:
    """Validate, log the row and say it."""
    cfg = trainer.cfg
    with torch.random.fork_rng(devices=[]):  # validating leaves the training's stream alone
        val = validate(trainer)
    metrics.log(trainer.step, "val", val)
    bar.write(f"step {trainer.step}: validation query {' and '.join(val)} after {cfg.eval_inner_steps} inner steps, "
              f"{cfg.val_tasks} tasks: " + ", ".join(f"{v:.4g}" for v in val.values()))


def _ready(trainer: Trainer, world: distributed.World, end: int, bar: Any, hold: Any) -> Any:
    """The training tasks, after the checks that could fail later (the validation split, the model's output)
    and the executor's settling (memory and, with ``auto``, the strategy trial) on the first batch."""
    cfg, learner, main = trainer.cfg, trainer.learner, world.is_main
    tasks = get_family(cfg.task).build(cfg, "train")
    trainer.input = trainer.input or input_record(cfg, tasks)
    if main and cfg.val_tasks and trainer.step < end:
        check_split(cfg, "val")
    if not learner.executor.settled or trainer.step == 0:  # measure memory (and, with auto, speed) before launching
        first = world.train_batch(tasks, cfg.seed, trainer.step, cfg.meta_batch).to(cfg.device, trainer.dtype)
        if model_spec(cfg)["name"] in USER_MODELS:
            check_model_output(learner.model, first, learner.kind, cfg.model, learner.output)
        learner.check_output(first.support_x[0])  # a selector that does not fit the model: refused before the trial
        with hold(), torch.random.fork_rng(devices=[]):  # no draws from the training's stream
            learner.executor.settle(learner.work(), first, iterations=end - trainer.step,
                                    say=bar.write if main else lambda msg: None)
    if main:
        bar.write(f"mamlkit: {learner.name} on {cfg.task}, strategy {learner.executor.strategy.name}, "
                  f"{world.size} rank(s), run folder {trainer.run_dir}")
    return tasks


def _log_train_row(trainer: Trainer, metrics: MetricsLog, bar: Any, timed: tuple[float, int],
                   start_time: float) -> tuple[float, int]:
    """Log the train row of the window in progress (each metric's mean over its steps; the speed since
    ``timed``, the time and step of this process's previous row) and close the window. Returns the time
    and step the next row's speed counts from."""
    cfg, now = trainer.cfg, time.perf_counter()
    row = window_row(trainer.log_window)
    row |= {"tasks_per_s": (trainer.step - timed[1]) * cfg.meta_batch / (now - timed[0]),
            "elapsed_s": now - start_time}
    metrics.log(trainer.step, "train", row)
    # the training batch's query metrics after the training's inner steps (not validation's)
    inner = getattr(trainer.learner, "inner_steps", cfg.inner_steps)
    bar.set_postfix({f"train {k} after {inner} step{'s' * (inner != 1)}": f"{v:.4g}"
                     for k, v in row.items() if k in ("loss", "acc")})
    trainer.log_window = {}
    return now, trainer.step


def _log_window_of(state: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A checkpoint's log window, checked (a file written before windows were saved has none: empty)."""
    window = state.get("log_window", {})
    if not is_window(window, state.get("step", 0)):
        raise checkpoint.CheckpointError(f"{path}: its log_window {str(window)[:200]} is not the running sums of a "
                                         "log window; the file is damaged")
    return window


def check_model_output(model: torch.nn.Module, batch: TaskBatch, kind: str, name: str,
                       output: Callable[[Any], torch.Tensor] | None = None) -> None:
    """Refuse a user's model whose predictions (the tensor ``output`` selects from what it returns) do not fit
    the task's targets: ``[N, *y_shape]`` for regression, logits ``[N, classes]`` for classification (on one
    task's support set)."""
    x, y = batch.support_x[0], batch.support_y[0]
    try:
        with torch.no_grad():  # on copies of the buffers: a BatchNorm's running statistics stay as they are
            buffers = {k: b.clone() for k, b in model.named_buffers()}
            out = torch.func.functional_call(model, buffers, (x,), strict=False)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported as the contract
        raise UserError(f"--model {name} fails on this task's inputs of shape {list(x.shape)} "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if output is not None:  # the learner's selector: a clear error when it does not fit what the model returns
        out = output(out)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"--model {name} returns a {type(out).__name__}; it must return a tensor of predictions")
    if kind == "classification":
        ok, want = out.dim() == 2 and out.shape[0] == len(y) and out.shape[1] > int(y.max()), \
            f"logits [{len(y)}, >= {int(y.max()) + 1}]"
    else:
        ok, want = out.shape == y.shape, f"{list(y.shape)}"
    if not ok:
        raise UserError(f"--model {name} maps inputs {list(x.shape)} to {list(out.shape)}; this task needs {want}")


def run_dir_for(cfg: config.TrainConfig, overwrite: bool = False) -> Path:
    """The run folder of a fresh run. One that holds a run's results (a checkpoint, a report:
    :func:`mamlkit.runfolder.results_in`) is refused unless ``overwrite``; one that holds only the config
    and logs of a run stopped before its first checkpoint holds no run, and the fresh run restarts its logs."""
    name = cfg.run_name or f"{cfg.preset or cfg.task}-{cfg.algo}"
    path = Path(cfg.out_dir) / name
    found = runfolder.results_in(path)
    if found and not overwrite:
        resume = (f"Resume it with `{resume_command_for(path, cfg.model)}`, pick" if "checkpoint.safetensors" in found
                  else "Pick")
        raise UserError(f"run folder {path} already holds a run ({', '.join(found)}). {resume} another folder with "
                        "--run-name or --out-dir, or pass --overwrite to replace it.")
    return path
