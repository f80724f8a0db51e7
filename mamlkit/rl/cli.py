"""``mamlkit rl train ENV`` and ``mamlkit rl eval CHECKPOINT``: meta-RL from the command line.

Every :class:`~mamlkit.rl.config.RLConfig` field is a flag; mistakes raise ``UserError`` (exit 2).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from mamlkit.base.errors import UserError
from mamlkit.config import load_yaml
from mamlkit.flags import add_config_flags, resumed_config
from mamlkit.rl import config as rlconfig
from mamlkit.rl.config import ENV_NAMES

# Fields that may change when a run is resumed; everything else defines the run.
RESUMABLE = {"iterations", "log_every", "checkpoint_every", "progress", "threads", "eval_tasks", "eval_traj",
             "eval_lrs", "baselines", "pretrain_iterations", "val_every"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``rl`` command group to the top-level subparsers."""
    rl = sub.add_parser("rl", help="meta-reinforcement learning (MAML-TRPO): train, eval",
                        description="Meta-RL with MAML-TRPO (Finn et al. 2017, §5.3).")
    rsub = rl.add_subparsers(dest="rl_command", required=True)
    train = rsub.add_parser("train", help="meta-train a policy on nav2d, cheetah-vel or cheetah-dir")
    train.add_argument("env", nargs="?", help=f"environment: {', '.join(ENV_NAMES)}")
    train.add_argument("--config", help="YAML file of config overrides")
    train.add_argument("--resume", metavar="RUN", help="continue the run in this folder or checkpoint")
    add_config_flags(train, rlconfig.RLConfig, "config fields (override --config)", skip=("env",))
    ev = rsub.add_parser("eval", help="evaluate a meta-RL run or checkpoint on fixed test tasks")
    ev.add_argument("checkpoint", help="run folder or checkpoint file written by `mamlkit rl train`")
    ev.add_argument("--eval-tasks", type=int, help="number of test tasks (default: the run's, 40)")
    ev.add_argument("--eval-traj", type=int, help="episodes per test task and step (default: the run's, 20)")
    ev.add_argument("--no-baselines", action="store_true", help="skip the pretrained and random baselines")
    ev.add_argument("--last", action="store_true",
                    help="evaluate the run's last checkpoint, not its best validated one (RUN/best.safetensors)")


def _best_or_last(trainer):
    """``(policy's trainer, what it is)``: the run's best validated policy (RUN/best.safetensors) if it
    has one, else ``trainer`` itself."""
    from mamlkit import checkpoint
    from mamlkit.rl import train

    best = train.best_path(trainer.run_dir)
    if not best.exists():
        return trainer, f"evaluating the policy of iteration {trainer.step} in {trainer.run_dir}"
    chosen = train.load_trainer(best)
    chosen.cfg = trainer.cfg  # evaluation settings as given now
    _, state = checkpoint.load(best)
    return chosen, (f"evaluating {best}: iteration {chosen.step} of {trainer.step}, the best validation "
                    f"return after 1 step ({state['val_return_post']:.2f} on {trainer.cfg.val_tasks} held-out "
                    "tasks); `mamlkit rl eval --last RUN` evaluates the last iteration")


def _report(trainer, baselines: bool, train_baseline: bool) -> str:
    """Evaluate the run's policy, and with ``baselines`` the pretrained one (trained first when
    ``train_baseline``, else loaded from RUN/pretrained if there) and a randomly initialised one."""
    import torch

    from mamlkit.rl import evaluate, train

    cfg = trainer.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policies = {cfg.algo: trainer.policy}
    if baselines and cfg.algo != "pretrain":
        folder = trainer.run_dir / "pretrained"
        if (folder / "checkpoint.safetensors").exists() and not train_baseline:
            policies["pretrained"] = train.load_trainer(folder).policy
        elif train_baseline and cfg.pretrain_iterations > 0:
            policies["pretrained"] = train.pretrained_baseline(trainer).policy
        policies["random init"] = train.make_policy(cfg.replace(seed=cfg.seed + 1))
    return evaluate.report(trainer.run_dir, policies, cfg)


def cmd_train(args: argparse.Namespace) -> int:
    from mamlkit.rl import train
    from mamlkit.runfolder import Stopped, stop_on_signals

    overrides = {k: v for k, v in vars(args).items() if k in rlconfig.field_types() and k != "env"}
    if args.resume:
        if args.env:
            raise UserError("pass either an environment or --resume RUN, not both")
        trainer = train.load_trainer(args.resume)
        trainer.cfg = resumed_config(trainer.cfg, overrides, RESUMABLE)
    else:
        if args.env not in ENV_NAMES:
            raise UserError(f"name an environment: `mamlkit rl train {{{'|'.join(ENV_NAMES)}}}` "
                            f"(got {args.env!r}), or pass --resume RUN")
        file_values = load_yaml(args.config) if args.config else {}
        cfg = rlconfig.from_dict({**file_values, **overrides, "env": args.env})
        trainer = train.new_trainer(cfg, train.run_dir_for(cfg))
    try:
        with stop_on_signals():
            train.fit(trainer)
            chosen, what = _best_or_last(trainer)
            print()
            print(what)
            print(_report(chosen, trainer.cfg.baselines, train_baseline=True))
    except Stopped as e:
        print(f"stopped by {signal.Signals(e.signum).name}. Resume with `mamlkit rl train --resume "
              f"{trainer.run_dir}`", file=sys.stderr)
        return 128 + e.signum
    print(f"run folder: {trainer.run_dir} (checkpoint.safetensors, best.safetensors, config.json, "
          "metrics.jsonl, eval.md, figures)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mamlkit.rl import train

    trainer = train.load_trainer(args.checkpoint)
    changes = {k: v for k, v in (("eval_tasks", args.eval_tasks), ("eval_traj", args.eval_traj))
               if v is not None}
    trainer.cfg = trainer.cfg.replace(**changes)
    what = f"evaluating the policy of iteration {trainer.step} from {args.checkpoint}"
    if Path(args.checkpoint).is_dir() and not args.last:
        trainer, what = _best_or_last(trainer)
    print(what)
    print(_report(trainer, trainer.cfg.baselines and not args.no_baselines, train_baseline=False))
    return 0


def main(args: argparse.Namespace) -> int:
    """Dispatch ``mamlkit rl ...``; called by :func:`mamlkit.cli.main`."""
    return {"train": cmd_train, "eval": cmd_eval}[args.rl_command](args)
