"""The meta-RL training loop: checkpoints (safetensors + JSON, atomic), progress bar and exact resume.

Meta-iteration ``s`` draws its tasks *and* its sampling noise from ``task_generator(seed, "train", s)``
alone, and TRPO keeps no optimiser state, so a resumed run repeats an uninterrupted one exactly.

Under torchrun every rank runs this loop on its block of each meta-batch's tasks
(:class:`~mamlkit.rl.maml_trpo.MAMLTRPO` with the job's :class:`~mamlkit.loop.distributed.World`); rank 0
alone writes the run folder and validates, and the ranks stop together, at the iteration they agree on.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mamlkit import checkpoint, runfolder
from mamlkit.base.batch import task_generator
from mamlkit.base.errors import Diverged, UserError
from mamlkit.base.limits import check_threads
from mamlkit.base.metrics import MetricsLog, add_to_window, is_window, window_row
from mamlkit.loop import distributed
from mamlkit.loop.guard import StepGuard, one_stop_for_all_ranks, rank_lock
from mamlkit.models import Workload, check_model_memory
from mamlkit.rl.config import RLConfig, from_stored
from mamlkit.rl.envs import check_env, env_dims, env_record, sample_tasks
from mamlkit.rl.families import find_family
from mamlkit.rl.maml_trpo import MAMLTRPO
from mamlkit.rl.policy import GaussianMLPPolicy, build_policy

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class RLTrainer:
    cfg: RLConfig
    policy: GaussianMLPPolicy
    run_dir: Path
    step: int = 0
    best_val: float | None = None  # best validation 1-step return so far (RUN/best.safetensors)
    # the log window in progress, carried in checkpoints (mamlkit.base.metrics.add_to_window)
    log_window: dict = field(default_factory=dict)
    resume_dir: Path | None = None  # the run a stop resumes, where not this one (the pretrained baseline's)

    @property
    def algo(self) -> MAMLTRPO:
        return MAMLTRPO(self.policy, self.cfg)


def make_policy(cfg: RLConfig) -> GaussianMLPPolicy:
    obs_dim, act_dim = env_dims(cfg.env)
    # refused before anything is allocated: the policy, and a meta-batch of episodes through it
    spec = {"name": "mlp", "in_features": obs_dim, "hidden": list(cfg.hidden_sizes), "out_features": 2 * act_dim}
    episodes = Workload((obs_dim,), cfg.traj_per_task * cfg.episode_len, tasks_held=cfg.tasks_per_batch,
                        tasks_at_once=cfg.tasks_per_batch, steps=max(cfg.inner_steps, 1), training=True,
                        shrink="--meta-batch, --traj-per-task, --horizon")
    check_model_memory(spec, DTYPES[cfg.dtype], episodes)
    return build_policy(obs_dim, act_dim, cfg.hidden_sizes, cfg.init_std, cfg.seed, DTYPES[cfg.dtype])


def new_trainer(cfg: RLConfig, run_dir: Path) -> RLTrainer:
    # the checkpoint stores the action scale and the batch themselves, not "the default", so a later
    # change of a default cannot change what a saved run does or resumes with
    cfg = cfg.replace(action_scale=cfg.env_action_scale, meta_batch=cfg.tasks_per_batch)
    check_env(cfg.env)  # an environment the installed packages lack is refused before the run folder exists
    return RLTrainer(cfg, make_policy(cfg), Path(run_dir))


def run_dir_for(cfg: RLConfig, overwrite: bool = False) -> Path:
    """The run folder of a fresh run; one that holds a checkpoint is refused unless ``overwrite``."""
    path = Path(cfg.out_dir) / (cfg.run_name or f"rl-{cfg.env}-{cfg.algo}")
    if (path / "checkpoint.safetensors").exists() and not overwrite:
        raise UserError(f"run folder {path} already holds a checkpoint. Resume it with `mamlkit rl train "
                        f"--resume {path}`, replace it with --overwrite, or pick another folder with --run-name or "
                        "--out-dir.")
    return path


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"mamlkit rl train --resume {run_dir}"


def best_or_last(trainer: RLTrainer) -> tuple[RLTrainer, str]:
    """``(policy's trainer, what it is)``: the run's best validated policy (RUN/best.safetensors) if it
    has one, else ``trainer`` itself."""
    best = best_path(trainer.run_dir)
    if not best.exists():
        return trainer, f"evaluating the policy of iteration {trainer.step} in {trainer.run_dir}"
    chosen = load_trainer(best)
    # a policy of this run: the run's shapes, since the run's settings (below) evaluate it
    checkpoint.check_tensors({f"meta/{k}": p for k, p in chosen.policy.named_parameters()}, "meta/",
                             dict(trainer.policy.named_parameters()), where=f"best policy {best} of the run")
    chosen.cfg = trainer.cfg  # evaluation settings as given now
    _, state = checkpoint.load(best)
    if "val_return_post" not in state:
        raise checkpoint.CheckpointError(f"{best} holds no val_return_post (its validation return); the file is "
                                         "damaged. `mamlkit rl eval --last RUN` evaluates the last iteration")
    return chosen, (f"evaluating {best}: iteration {chosen.step} of {trainer.step}, the best validation "
                    f"return after 1 step ({state['val_return_post']:.2f} on {trainer.cfg.val_tasks} held-out "
                    "tasks); `mamlkit rl eval --last RUN` evaluates the last iteration")


def save_checkpoint(trainer: RLTrainer, path: Path, **extra: float) -> None:
    """Policy parameters + JSON state (config, step, best validation return, ``extra``), atomically."""
    tensors = {f"meta/{k}": v for k, v in trainer.policy.named_parameters()}
    if not checkpoint.all_finite(tensors.values()):  # never a checkpoint of a diverged run (fit checks first)
        raise Diverged(f"the policy of step {trainer.step} holds NaN or inf; {path} is not written")
    state = {"kind": "rl", "config": trainer.cfg.to_dict(), "algo": trainer.cfg.algo, "step": trainer.step,
             "best_val": trainer.best_val, "log_window": trainer.log_window} | extra
    if record := env_record(trainer.cfg):
        state["environment"] = record  # Meta-World: the package's and the reward functions' versions
    checkpoint.save(path, tensors, state)


def validation_tasks(cfg: RLConfig):
    """The fixed held-out tasks of the validation (split ``"val"``, disjoint draws from train and test)."""
    return sample_tasks(cfg.env, cfg.val_tasks, task_generator(cfg.seed, "val", 0), "val", cfg.seed)


def validate(trainer: RLTrainer) -> dict[str, float]:
    """Mean return before and after one inner step (α = ``inner_lr``) on the validation tasks.

    The tasks and the sampling noise are the same at every validation (paired comparisons between
    iterations), and the training generators are untouched, so validating does not change training.
    """
    cfg = trainer.cfg
    curve, _ = trainer.algo.adapt_curve(validation_tasks(cfg), (cfg.inner_lr,),
                                        task_generator(cfg.seed, "val", 0, "rollouts"), cfg.traj_per_task)
    pre, post = curve.double().mean(0).tolist()
    return {"return_pre": pre, "return_post": post}


def best_path(run_dir: Path) -> Path:
    return Path(run_dir) / "best.safetensors"


def load_trainer(path: str | Path) -> RLTrainer:
    """Rebuild a trainer from a run folder or checkpoint file, ready to continue where it stopped."""
    tensors, state = checkpoint.load(path)  # the one validation of every mamlkit file: schema, digests, finite
    if state.get("kind") != "rl":
        raise checkpoint.CheckpointError(f"{path} is a supervised mamlkit checkpoint; evaluate it with "
                                         "`mamlkit eval`, not `mamlkit rl eval`")
    lacking = [k for k in ("config", "step") if k not in state]
    if lacking:
        raise checkpoint.CheckpointError(f"{path} holds no {' or '.join(lacking)}; the file is damaged or was not "
                                         "written by `mamlkit rl train`")
    cfg = rl_config_of(state["config"], path)
    policy = make_policy(cfg)
    params = dict(policy.named_parameters())
    # names, exact shapes and dtypes, as for supervised checkpoints: copy_ would broadcast a [100] weight
    checkpoint.check_tensors(tensors, "meta/", params, where="policy checkpoint")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"meta/{k}"])
    ckpt = Path(path)
    window = state.get("log_window", {})
    if not is_window(window, state["step"] if isinstance(state["step"], int) else 0):
        raise checkpoint.CheckpointError(f"{path}: its log_window {str(window)[:200]} is not the running sums of a "
                                         "log window; the file is damaged")
    return RLTrainer(cfg, policy, ckpt if ckpt.is_dir() else ckpt.parent, step=state["step"],
                     best_val=state.get("best_val"), log_window=window)


def rl_config_of(stored: dict, path: str | Path) -> RLConfig:
    """The run config of a meta-RL checkpoint (its state's ``config``, an object: checked on load); an invalid
    one is a CheckpointError naming the file."""
    # runs written before action_scale existed applied the policy's actions unscaled; those written
    # before the scale was stored explicitly (0) used the defaults of that time (its family's legacy scale).
    # Configs written when every option was a field of every RL config hold the options of plug-ins the run
    # did not choose (a nav2d run's reward_version): from_stored drops those at their defaults.
    raw = {"action_scale": 1.0} | stored
    family = find_family(raw.get("env", "nav2d"))  # an unknown env is named below
    if not raw["action_scale"] and family is not None:
        raw["action_scale"] = family.action_scale if family.legacy_action_scale is None else family.legacy_action_scale
    try:
        return from_stored(raw)
    except UserError as e:
        raise checkpoint.CheckpointError(f"{path}: its run config is invalid: {e}") from None


def _check_progress(guard: StepGuard, stats: dict[str, float], step: int) -> None:
    """Stop a run whose surrogate loss or meta-gradient is not finite: TRPO then rejects every step and the
    policy never changes again, so training on would only log NaN (the check is on floats already at hand)."""
    bad = {k: stats[k] for k in ("loss_before", "grad_norm") if k in stats and not math.isfinite(stats[k])}
    if bad:
        names = {"loss_before": "surrogate loss", "grad_norm": "meta-gradient's norm"}
        raise guard.diverged(step, " and ".join(f"its {names[k]} ({k}) is {v}" for k, v in bad.items()))


def _policy_settings(cfg: RLConfig) -> tuple[str, str]:
    """A meta-RL run's likely cause of divergence, and what to do (:class:`StepGuard`)."""
    return (f"a setting too large for this policy (--inner-lr {cfg.inner_lr:g}, --init-std {cfg.init_std:g}, "
            f"--max-kl {cfg.max_kl:g})", "Start a new run with smaller settings (--overwrite replaces this one).")


def _policy_undo(trainer: RLTrainer):
    """The policy's parameters now, to be put back: an abandoned iteration leaves the checkpoint's step count
    matching its parameters. TRPO keeps no optimiser state, and the draws come from the step's own generator."""
    snapshot = {k: p.detach().clone() for k, p in trainer.policy.named_parameters()}

    def undo() -> None:
        with torch.no_grad():
            for k, p in trainer.policy.named_parameters():
                p.copy_(snapshot[k])
    return undo


def _policy_tensors(trainer: RLTrainer):
    return trainer.policy.parameters()


def _validate_and_keep_best(trainer: RLTrainer, step: int, metrics: MetricsLog, write) -> None:
    """Validate the policy of iteration ``step``; if it is the best so far, save it as ``best.safetensors``.
    A stop signal ends the validation at its next episode step, and the iteration is rolled back."""
    with runfolder.current().interruptible():
        val = validate(trainer)
    if trainer.best_val is None or val["return_post"] > trainer.best_val:
        trainer.best_val = val["return_post"]
        save_checkpoint(trainer, best_path(trainer.run_dir), step=step, val_return_pre=val["return_pre"],
                        val_return_post=val["return_post"])
    metrics.log(step, "val", val | {"best_return_post": trainer.best_val})
    write(f"step {step}: validation return {val['return_pre']:.2f} before, {val['return_post']:.2f} after "
          f"1 step (best {trainer.best_val:.2f})")


# What the trainer writes into its run folder (registered in mamlkit.runfolder).
RUN_FILES = ("checkpoint.safetensors", "best.safetensors", "config.json", "metrics.jsonl", "metrics.csv")


def fit(trainer: RLTrainer, stop_at: int | None = None) -> RLTrainer:
    """Meta-train from ``trainer.step`` to ``cfg.iterations`` (or ``stop_at``), checkpointing on the way
    and validating every ``cfg.val_every`` iterations (the best policy goes to ``best.safetensors``).

    The step's guards are the supervised trainer's (:class:`~mamlkit.loop.guard.StepGuard`): on
    KeyboardInterrupt (and the CLI's SIGINT/SIGTERM) the unfinished iteration is rolled back and
    ``checkpoint.safetensors`` written, then the exception propagates. Launched by torchrun, the ranks
    share each meta-batch (:mod:`mamlkit.loop.distributed`); a stop signal on any rank stops every rank
    after the same iteration, and rank 0 writes the checkpoint."""
    cfg = trainer.cfg
    if cfg.threads:
        check_threads(cfg.threads)
        torch.set_num_threads(cfg.threads)
    run_dir = trainer.run_dir
    with distributed.session(cfg) as world, one_stop_for_all_ranks(world):
        if world.size > 1:
            world.shard(cfg.tasks_per_batch)  # a rank without a task is a UserError, before any work
            if not cfg.fast_fisher:
                raise UserError("--no-fast-fisher (autograd through one process's whole meta-batch) runs in one "
                                "process only: drop it, or run without torchrun")
        guard = StepGuard(trainer, world, save_checkpoint, lambda: resume_command(trainer.resume_dir or run_dir),
                          tensors=_policy_tensors, cause=_policy_settings, undo=_policy_undo)
        with rank_lock(run_dir, world), guard.disk_full():
            if world.is_main:
                runfolder.record(run_dir, RUN_FILES)  # before they are written: a later --overwrite finds them
                runfolder.prepare(run_dir, trainer.step)
                checkpoint.atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
            return _fit(trainer, stop_at, world, guard)


def _fit(trainer: RLTrainer, stop_at: int | None, world: distributed.World, guard: StepGuard) -> RLTrainer:
    cfg, run_dir, main = trainer.cfg, trainer.run_dir, world.is_main
    metrics = MetricsLog(run_dir, tensorboard=False, enabled=main)
    algo = MAMLTRPO(trainer.policy, cfg, world)
    end = min(stop_at or cfg.iterations, cfg.iterations)
    bar = tqdm(total=end, initial=trainer.step, disable=not (cfg.progress and main),
               desc=f"{cfg.env} {cfg.algo}", dynamic_ncols=True, unit="it")
    start = time.perf_counter()
    try:
        with guard.stops(bar):
            while trainer.step < end:
                guard.begin()  # an interrupted iteration is rolled back, so the checkpoint matches its step count
                gen = task_generator(cfg.seed, "train", trainer.step)
                tasks = sample_tasks(cfg.env, cfg.tasks_per_batch, gen, "train", cfg.seed)
                # A stop signal is never raised inside torch: cut in two, vmap's levels or functional_call's
                # swapped-in parameters leave the process's torch state broken (the rollback itself then
                # fails). One that lands during the iteration takes effect once it is finished, logged and
                # checkpointed.
                with guard.hold():
                    stats = algo.meta_step(tasks, gen)
                    _check_progress(guard, stats, trainer.step + 1)  # the same all-reduced numbers on every rank
                    _after_step(trainer, guard, stats, metrics, bar, start, end)
                bar.update(1)
                guard.agree()  # the ranks, their stop signals held, stop together
    finally:
        bar.close()
        with contextlib.suppress(OSError):  # a full disk is reported by the write that hit it
            metrics.close()
    return trainer


def _after_step(trainer: RLTrainer, guard: StepGuard, stats: dict[str, float], metrics: MetricsLog, bar,
                start: float, end: int) -> None:
    """Validate, log and checkpoint the iteration just taken; it counts once this returns."""
    cfg, main, step = trainer.cfg, guard.world.is_main, trainer.step + 1
    if main and cfg.val_every and cfg.inner_steps and step % cfg.val_every == 0:
        _validate_and_keep_best(trainer, step, metrics, bar.write)
    add_to_window(trainer.log_window, stats)
    # a row at the run's end, not at a `stop_at` (the run goes on: its window is checkpointed)
    if step % cfg.log_every == 0 or step == cfg.iterations:  # rank 0 alone writes (metrics)
        row = window_row(trainer.log_window)
        row["elapsed_s"] = time.perf_counter() - start
        metrics.log(step, "train", row)
        bar.set_postfix({k.replace("return_", "R_"): f"{row[k]:.1f}"
                         for k in ("return_pre", "return_post") if k in row})
        trainer.log_window = {}
    trainer.step = step
    if main and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == end):
        guard.save()


def pretrained_baseline(trainer: RLTrainer) -> RLTrainer:
    """Train (or resume, or load) the joint-training TRPO baseline in ``RUN/pretrained``."""
    folder = trainer.run_dir / "pretrained"
    if (folder / "checkpoint.safetensors").exists():
        base = load_trainer(folder)
    else:
        cfg = trainer.cfg.replace(algo="pretrain", inner_steps=0, run_name="pretrained",
                                  iterations=max(1, trainer.cfg.pretrain_iterations))
        base = new_trainer(cfg, folder)
    base.resume_dir = trainer.run_dir  # a stop in it resumes the run, which then reports too
    return fit(base)
