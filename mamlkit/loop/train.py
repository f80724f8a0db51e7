"""The meta-training loop, checkpoints and exact resume."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mamlkit import checkpoint, config
from mamlkit.algorithms import MetaLearner, build_learner
from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.base.metrics import MetricsLog, mean_ci, read_jsonl
from mamlkit.exec import kernels, strategies, tuning
from mamlkit.loop import distributed
from mamlkit.loop.schedules import meta_lr_at, meta_optimizer
from mamlkit.models import USER_MODELS, build_model, resolve_spec
from mamlkit.tasks import get_family, task_generator

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Trainer:
    """A model, its meta-learner and meta-optimiser, and where the run writes."""

    cfg: config.TrainConfig
    learner: MetaLearner
    optimizer: torch.optim.Optimizer
    run_dir: Path
    step: int = 0

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
    meta-parameters from ``state`` if given.

    The initial weights come from ``cfg.seed`` in a forked RNG, so the global RNG is untouched.
    """
    spec = spec or model_spec(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(spec)
    model = model.to(device=cfg.device, dtype=DTYPES[cfg.dtype])
    learner = build_learner(cfg.algo, model, cfg)
    if learner.strategy.compiled and not getattr(learner, "compilable", False):
        raise config.ConfigError(f"--strategy compile is not available for --algo {cfg.algo}; use auto, vmap or loop")
    if state is not None:
        restore(learner, state)
    return learner, spec


def restore(learner: MetaLearner, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's ``meta/*`` parameters and ``buffer/*`` buffers into ``learner``."""
    params = learner.meta_parameters()
    missing = [k for k in params if f"meta/{k}" not in tensors]
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint lacks meta-parameters {missing[:5]}; it was written "
                                         "for another model or algorithm")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"meta/{k}"])
        for k, b in learner.model.named_buffers():
            if f"buffer/{k}" in tensors:
                b.copy_(tensors[f"buffer/{k}"])


def save_checkpoint(trainer: Trainer, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write meta-parameters, buffers, optimiser and RNG state, and the resolved config, atomically."""
    learner = trainer.learner
    tensors = {f"meta/{k}": v for k, v in learner.meta_parameters().items()}
    tensors |= {f"buffer/{k}": v for k, v in learner.model.named_buffers()}
    opt_tensors, opt_meta = checkpoint.optimizer_tensors(trainer.optimizer.state_dict())
    tensors |= opt_tensors
    tensors["rng/torch"] = checkpoint.rng_tensor()
    state = {"config": trainer.cfg.to_dict(), "model_spec": model_spec(trainer.cfg),
             "algo": learner.name, "kind": learner.kind, "step": trainer.step, "optimizer": opt_meta,
             "strategy": learner.strategy.name, **(extra or {})}
    checkpoint.save(path, tensors, state)


def load_trainer(path: str | Path, run_dir: Path | None = None) -> Trainer:
    """Rebuild a :class:`Trainer` from a checkpoint, ready to continue exactly where it stopped."""
    tensors, state = checkpoint.load(path)
    cfg = config.from_dict(state["config"])
    learner, _ = build(cfg, tensors, _user_spec(state))
    optimizer = meta_optimizer(cfg, learner.meta_parameters().values())
    optimizer.load_state_dict(checkpoint.optimizer_state(tensors, state["optimizer"]))
    torch.set_rng_state(tensors["rng/torch"])
    if learner.strategy.auto and state.get("strategy"):
        # keep what the run measured and used, so the resumed run computes exactly the same numbers
        learner.strategy = strategies.Strategy.from_name(state["strategy"])
    ckpt = Path(path)
    run_dir = run_dir or (ckpt if ckpt.is_dir() else ckpt.parent)
    return Trainer(cfg, learner, optimizer, run_dir, step=state["step"])


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


def fit(trainer: Trainer, stop_at: int | None = None) -> Trainer:
    """Meta-train from ``trainer.step`` to ``cfg.iterations`` (or ``stop_at``), checkpointing on the way.

    Task batch ``s`` is drawn from ``(seed, "train", s)`` alone, so a resumed run sees exactly the
    tasks an uninterrupted one would. Launched by torchrun, the ``meta_batch`` tasks are split across
    the ranks and their gradients summed (:mod:`mamlkit.loop.distributed`); rank 0 alone logs, validates and
    writes checkpoints, and the last checkpoint is on disk when ``fit`` returns on any rank.
    """
    if trainer.cfg.threads:
        torch.set_num_threads(trainer.cfg.threads)
    if trainer.cfg.tune_malloc:
        tuning.tune_malloc()
    kernels.set_enabled(trainer.cfg.fast_kernels)
    with distributed.session(trainer.cfg) as world:
        world.broadcast_(trainer.learner)  # every rank starts from rank 0's meta-parameters
        _fit_loop(trainer, stop_at, world)
        world.barrier()
    return trainer


def _fit_loop(trainer: Trainer, stop_at: int | None, world: distributed.World) -> None:
    cfg, learner, opt, main = trainer.cfg, trainer.learner, trainer.optimizer, world.is_main
    if main:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(trainer.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        _truncate_metrics(trainer.run_dir, trainer.step)
    metrics = MetricsLog(trainer.run_dir, tensorboard=cfg.tensorboard, enabled=main)
    tasks = get_family(cfg.task).build(cfg, "train")
    end = min(stop_at or cfg.iterations, cfg.iterations)
    bar = tqdm(total=end, initial=trainer.step, disable=not (cfg.progress and main),
               desc=f"{cfg.run_name or cfg.task}", dynamic_ncols=True, unit="it")
    if learner.strategy.auto or trainer.step == 0:  # measure memory (and, with auto, speed) before launching
        first = world.train_batch(tasks, cfg.seed, trainer.step, cfg.meta_batch).to(cfg.device, trainer.dtype)
        if model_spec(cfg)["name"] in USER_MODELS:
            check_model_output(learner.model, first, learner.kind, cfg.model)
        tuning.settle_strategy(learner, first, iterations=end - trainer.step, memory_budget_mb=cfg.memory_budget,
                               say=bar.write if main else lambda msg: None)
    if main:
        bar.write(f"mamlkit: {learner.name} on {cfg.task}, strategy {learner.strategy.name}, {world.size} rank(s), "
                  f"run folder {trainer.run_dir}")
    start_time, window = time.perf_counter(), []
    window_start = start_time
    try:
        while trainer.step < end:
            batch = world.train_batch(tasks, cfg.seed, trainer.step, cfg.meta_batch)  # this rank's share
            opt.zero_grad(set_to_none=True)
            if hasattr(learner, "set_step"):  # step-dependent algorithms (MAML++ annealing)
                learner.set_step(trainer.step)
            for group in opt.param_groups:  # a pure function of the step: resume-exact
                group["lr"] = meta_lr_at(cfg, trainer.step)
            stats = world.meta_backward(learner, batch.to(cfg.device, trainer.dtype), cfg.meta_batch)
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
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "acc")})
                window = []
            if main and cfg.val_tasks and (trainer.step % cfg.val_every == 0 or trainer.step == end):
                val = validate(trainer)
                metrics.log(trainer.step, "val", val)
                bar.write(f"step {trainer.step}: val " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
            if main and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == end):
                save_checkpoint(trainer, trainer.run_dir / "checkpoint.safetensors")
            bar.update(1)
    except KeyboardInterrupt:
        if main:
            save_checkpoint(trainer, trainer.run_dir / "checkpoint.safetensors")
            bar.write(f"interrupted at step {trainer.step}; checkpoint saved. Resume with "
                      f"`mamlkit train --resume {trainer.run_dir}`")
        raise
    finally:
        bar.close()
        metrics.close()


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


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint so the logs match an uninterrupted run."""
    path = run_dir / "metrics.jsonl"
    if step == 0 or not path.exists():
        return
    records = [r for r in read_jsonl(path) if r["step"] <= step]
    checkpoint.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def run_dir_for(cfg: config.TrainConfig) -> Path:
    name = cfg.run_name or f"{cfg.preset or cfg.task}-{cfg.algo}"
    path = Path(cfg.out_dir) / name
    if (path / "checkpoint.safetensors").exists():
        raise UserError(f"run folder {path} already holds a checkpoint. Resume it with `mamlkit train --resume "
                        f"{path}`, or pick another folder with --run-name or --out-dir.")
    return path
