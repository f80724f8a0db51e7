"""The meta-RL training loop: checkpoints (safetensors + JSON, atomic), progress bar and exact resume.

Meta-iteration ``s`` draws its tasks *and* its sampling noise from ``task_generator(seed, "train", s)``
alone, and TRPO keeps no optimiser state, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mamlkit import checkpoint, runfolder
from mamlkit.base.batch import task_generator
from mamlkit.base.errors import UserError
from mamlkit.base.metrics import MetricsLog
from mamlkit.rl.config import LEGACY_ACTION_SCALE, RLConfig, from_dict
from mamlkit.rl.envs import env_dims, sample_tasks
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

    @property
    def algo(self) -> MAMLTRPO:
        return MAMLTRPO(self.policy, self.cfg)


def make_policy(cfg: RLConfig) -> GaussianMLPPolicy:
    obs_dim, act_dim = env_dims(cfg.env)
    return build_policy(obs_dim, act_dim, cfg.hidden_sizes, cfg.init_std, cfg.seed, DTYPES[cfg.dtype])


def new_trainer(cfg: RLConfig, run_dir: Path) -> RLTrainer:
    # the checkpoint stores the action scale and the batch themselves, not "the default", so a later
    # change of a default cannot change what a saved run does or resumes with
    cfg = cfg.replace(action_scale=cfg.env_action_scale, meta_batch=cfg.tasks_per_batch)
    return RLTrainer(cfg, make_policy(cfg), Path(run_dir))


def run_dir_for(cfg: RLConfig) -> Path:
    path = Path(cfg.out_dir) / (cfg.run_name or f"rl-{cfg.env}-{cfg.algo}")
    if (path / "checkpoint.safetensors").exists():
        raise UserError(f"run folder {path} already holds a checkpoint. Resume it with `mamlkit rl train "
                        f"--resume {path}`, or pick another folder with --run-name or --out-dir.")
    return path


def save_checkpoint(trainer: RLTrainer, path: Path, **extra: float) -> None:
    """Policy parameters + JSON state (config, step, best validation return, ``extra``), atomically."""
    tensors = {f"meta/{k}": v for k, v in trainer.policy.named_parameters()}
    state = {"kind": "rl", "config": trainer.cfg.to_dict(), "algo": trainer.cfg.algo, "step": trainer.step,
             "best_val": trainer.best_val} | extra
    checkpoint.save(path, tensors, state)


def validation_tasks(cfg: RLConfig):
    """The fixed held-out tasks of the validation (split ``"val"``, disjoint draws from train and test)."""
    return sample_tasks(cfg.env, cfg.val_tasks, task_generator(cfg.seed, "val", 0))


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
    tensors, state = checkpoint.load(path)
    if state.get("kind") != "rl":
        raise checkpoint.CheckpointError(f"{path} is a supervised mamlkit checkpoint; evaluate it with "
                                         "`mamlkit eval`, not `mamlkit rl eval`")
    # runs written before action_scale existed applied the policy's actions unscaled; those written
    # before the scale was stored explicitly (0) used the defaults of that time
    raw = {"action_scale": 1.0} | state["config"]
    if not raw["action_scale"]:
        raw["action_scale"] = LEGACY_ACTION_SCALE[raw.get("env", "nav2d")]
    cfg = from_dict(raw)
    policy = make_policy(cfg)
    with torch.no_grad():
        for k, p in policy.named_parameters():
            if f"meta/{k}" not in tensors:
                raise checkpoint.CheckpointError(f"checkpoint {path} lacks policy parameter {k}")
            p.copy_(tensors[f"meta/{k}"])
    ckpt = Path(path)
    return RLTrainer(cfg, policy, ckpt if ckpt.is_dir() else ckpt.parent, step=state["step"],
                     best_val=state.get("best_val"))


def _validate_and_keep_best(trainer: RLTrainer, step: int, metrics: MetricsLog, write) -> None:
    """Validate the policy of iteration ``step``; if it is the best so far, save it as ``best.safetensors``."""
    val = validate(trainer)
    if trainer.best_val is None or val["return_post"] > trainer.best_val:
        trainer.best_val = val["return_post"]
        save_checkpoint(trainer, best_path(trainer.run_dir), step=step, val_return_pre=val["return_pre"],
                        val_return_post=val["return_post"])
    metrics.log(step, "val", val | {"best_return_post": trainer.best_val})
    write(f"step {step}: validation return {val['return_pre']:.2f} before, {val['return_post']:.2f} after "
          f"1 step (best {trainer.best_val:.2f})")


def fit(trainer: RLTrainer, stop_at: int | None = None) -> RLTrainer:
    """Meta-train from ``trainer.step`` to ``cfg.iterations`` (or ``stop_at``), checkpointing on the way
    and validating every ``cfg.val_every`` iterations (the best policy goes to ``best.safetensors``).

    On KeyboardInterrupt (and the CLI's SIGINT/SIGTERM) the unfinished iteration is rolled back and
    ``checkpoint.safetensors`` written, then the exception propagates."""
    cfg = trainer.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = trainer.run_dir
    with runfolder.lock(run_dir):
        runfolder.prepare(run_dir, trainer.step)
        checkpoint.atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        return _fit(trainer, stop_at)


def _fit(trainer: RLTrainer, stop_at: int | None) -> RLTrainer:
    cfg, run_dir = trainer.cfg, trainer.run_dir
    metrics = MetricsLog(run_dir, tensorboard=False)
    algo = trainer.algo
    end = min(stop_at or cfg.iterations, cfg.iterations)
    bar = tqdm(total=end, initial=trainer.step, disable=not cfg.progress, desc=f"{cfg.env} {cfg.algo}",
               dynamic_ncols=True, unit="it")
    start, window, snapshot = time.perf_counter(), [], None
    signals = runfolder.current()
    try:
        while trainer.step < end:
            gen = task_generator(cfg.seed, "train", trainer.step)
            tasks = sample_tasks(cfg.env, cfg.tasks_per_batch, gen)
            # an interrupted iteration is rolled back, so the checkpoint matches its step count
            snapshot = {k: p.detach().clone() for k, p in trainer.policy.named_parameters()}
            # A stop signal is never raised inside torch: cut in two, vmap's levels or functional_call's
            # swapped-in parameters leave the process's torch state broken (the rollback itself then
            # fails). One that lands during the iteration takes effect once it is finished, logged and
            # checkpointed.
            with signals.deferred():
                stats = algo.meta_step(tasks, gen)
                step = trainer.step + 1
                if cfg.val_every and cfg.inner_steps and step % cfg.val_every == 0:
                    _validate_and_keep_best(trainer, step, metrics, bar.write)
                window.append(stats)
                if step % cfg.log_every == 0 or step == end:
                    row = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    row["elapsed_s"] = time.perf_counter() - start
                    metrics.log(step, "train", row)
                    bar.set_postfix({k.replace("return_", "R_"): f"{row[k]:.1f}"
                                     for k in ("return_pre", "return_post") if k in row})
                    window = []
                trainer.step, snapshot = step, None
                if trainer.step % cfg.checkpoint_every == 0 or trainer.step == end:
                    save_checkpoint(trainer, run_dir / "checkpoint.safetensors")
            bar.update(1)
    except KeyboardInterrupt:
        if snapshot is not None:
            with torch.no_grad():
                for k, p in trainer.policy.named_parameters():
                    p.copy_(snapshot[k])
        save_checkpoint(trainer, run_dir / "checkpoint.safetensors")
        bar.write(f"interrupted at step {trainer.step}; checkpoint saved to {run_dir / 'checkpoint.safetensors'}")
        raise
    finally:
        bar.close()
        metrics.close()
    return trainer


def pretrained_baseline(trainer: RLTrainer) -> RLTrainer:
    """Train (or resume, or load) the joint-training TRPO baseline in ``RUN/pretrained``."""
    folder = trainer.run_dir / "pretrained"
    if (folder / "checkpoint.safetensors").exists():
        base = load_trainer(folder)
    else:
        cfg = trainer.cfg.replace(algo="pretrain", inner_steps=0, run_name="pretrained",
                                  iterations=max(1, trainer.cfg.pretrain_iterations))
        base = new_trainer(cfg, folder)
    return fit(base)
