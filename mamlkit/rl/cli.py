"""``mamlkit rl train ENV``, ``mamlkit rl eval RUN`` and ``mamlkit rl adapt RUN --goal X Y``: meta-RL
from the command line. Each parses, asks the recipe (:mod:`mamlkit.loop.run`) and prints.

Every :class:`~mamlkit.rl.config.RLConfig` field is a flag; mistakes raise ``UserError`` (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mamlkit.config import load_yaml
from mamlkit.flags import add_config_command, add_config_flags, add_threads_flag
from mamlkit.rl import config as rlconfig
from mamlkit.rl import families
from mamlkit.rl.adapt_inputs import ARENA


def help_env(argv: list[str]) -> str | None:
    """The environment named in ``mamlkit rl train ENV --help``, whose values the help then shows."""
    if argv[:2] != ["rl", "train"] or not {"-h", "--help"} & set(argv):
        return None
    return next((a for a in argv[2:] if families.find_family(a) is not None), None)


def env_values(env: str) -> rlconfig.RLConfig:
    """The config a run on ``env`` starts from, with the env's defaults (horizon, action_scale and
    meta_batch 0) resolved to the values the run uses."""
    cfg = rlconfig.RLConfig(env=env)
    return cfg.replace(horizon=cfg.episode_len, action_scale=cfg.env_action_scale, meta_batch=cfg.tasks_per_batch)


def add_parser(sub: argparse._SubParsersAction, help_env: str | None = None) -> None:
    """Add the ``rl`` command group to the top-level subparsers; ``help_env`` makes `rl train --help` show
    that environment's values instead of the defaults."""
    rl = sub.add_parser("rl", help="meta-reinforcement learning (MAML-TRPO): train, eval, adapt",
                        description="Meta-RL with MAML-TRPO (Finn et al. 2017, §5.3).")
    rsub = rl.add_subparsers(dest="rl_command", required=True)
    train = add_config_command(
        rsub, "train", help=f"meta-train a policy on {families.known()}",
        usage="mamlkit rl train [ENV] [--config FILE] [--resume RUN] [--FIELD VALUE ...]",
        about="Meta-train a policy with MAML-TRPO.", values_from=help_env,
        hint="`mamlkit rl train ENV --help` shows an environment's")
    train.add_argument("env", nargs="?", metavar="ENV", help=f"environment: {families.known()}")
    add_config_flags(train, rlconfig.RLConfig, skip=("env",), groups=rlconfig.GROUPS,
                     **({"values": env_values(help_env), "values_from": help_env} if help_env else {}))
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in the run folder (exactly the files it wrote) with a fresh one")
    ev = rsub.add_parser("eval", help="evaluate a meta-RL run or checkpoint on fixed test tasks")
    ev.add_argument("checkpoint", help="run folder or checkpoint file written by `mamlkit rl train`")
    ev.add_argument("--eval-tasks", type=int, metavar="N", help="number of test tasks (default: the run's, 40)")
    ev.add_argument("--eval-traj", type=int, metavar="N",
                    help="episodes per test task and step (default: the run's; for new runs 4,000 "
                         "steps' worth as the paper's code: 40 nav2d, 20 cheetah)")
    ev.add_argument("--steps", type=int, nargs="+", metavar="K",
                    help="report the return after these numbers of test steps (e.g. 1 2 3; rates 0.1 for the "
                         "first, 0.05 after, as the paper's App. A.2; default: the run's --eval-lrs)")
    ev.add_argument("--eval-lrs", type=float, nargs="+", metavar="A",
                    help="α of test steps 1, 2, 3, ... (the last repeats; default: the run's, 0.1 0.05 0.05; the "
                         "paper's code tested nav2d with 0.5 0.25)")
    ev.add_argument("--no-baselines", action="store_true", help="skip the pretrained and random baselines")
    ev.add_argument("--eval-episodes", type=int, default=3, metavar="N",
                    help="Meta-World runs: episodes its official evaluation scores per goal after adapting (default 3, "
                         "the package's); --eval-tasks is then the number of test goals, --eval-traj the adaptation "
                         "episodes per goal and step")
    ev.add_argument("--out", metavar="DIR", help="write eval.md, eval.json and the figures into DIR (default: the "
                    "run's folder, or the checkpoint's)")
    ev.add_argument("--overwrite", action="store_true", help="replace the report files already there")
    ev.add_argument("--last", action="store_true",
                    help="evaluate the run's last checkpoint, not its best validated one (RUN/best.safetensors)")
    add_threads_flag(ev, "default: the run's --threads")

    ad = rsub.add_parser("adapt", help="adapt a meta-trained policy to a goal and draw its trajectories",
                         description="Adapt a meta-trained policy with 1-3 policy-gradient steps (the run's test "
                                     "rates, 0.1 then 0.05 by default) and write the figure of its mean-action "
                                     "trajectories before and after each step: a 2D-navigation policy to the goal "
                                     "(X, Y); a Meta-World one to the goal (X, Y, Z) or to a test task of its "
                                     "benchmark (--test-task), drawing the end effector's path.")
    ad.add_argument("checkpoint", help="`nav2d` (the meta-trained policy shipped with mamlkit), or a nav2d or "
                                       "Meta-World run folder (its best validated policy) or checkpoint file")
    ad.add_argument("--goal", type=float, nargs="+", metavar="X", action=_GoalAction,
                    help=f"goal position: X Y for nav2d, each in [{ARENA[0]}, {ARENA[1]}] (the training goals' "
                         "range); X Y Z for Meta-World, inside the task type's goal space")
    ad.add_argument("--test-task", type=int, metavar="INDEX",
                    help="Meta-World: adapt to this task of the benchmark's test split instead of --goal")
    ad.add_argument("--task-type", metavar="NAME",
                    help="Meta-World ML10: the test task type of --goal (e.g. drawer-close)")
    ad.add_argument("--steps", type=int, default=3, metavar="K", help="adaptation steps, 1 to 3 (default 3)")
    ad.add_argument("--traj", type=int, default=20, metavar="N",
                    help="episodes sampled per step (default 20, the paper's)")
    ad.add_argument("--out", metavar="FILE",
                    help="figure to write (default nav2d_adapt.png, or ENV_adapt.png for Meta-World)")
    ad.add_argument("--video", metavar="FILE.gif",
                    help="Meta-World: also render the mean-action episodes (before and after each step, side by "
                         "side) to this animated GIF, through MuJoCo's offscreen OpenGL (EGL or OSMesa)")
    ad.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the sampling noise (default 0)")
    add_threads_flag(ad, "default: the policy's run's --threads")


def cmd_train(args: argparse.Namespace) -> int:
    from mamlkit import runfolder
    from mamlkit.loop import run
    from mamlkit.rl import train

    given = {k: v for k, v in vars(args).items() if k in rlconfig.field_types() and k != "env"}
    request = run.RLRequest(env=args.env, resume=args.resume, given=given, overwrite=args.overwrite,
                            file_values=load_yaml(args.config) if args.config else {})
    started: list[Path] = []  # the run folder, once known: named in the message after a stop signal
    try:
        with runfolder.stop_on_signals():
            outcome = run.rl_train_run(request, started)
    except runfolder.Stopped as e:
        if run.is_main_rank():  # under torchrun every rank is stopped; one says so
            print(f"mamlkit: stopped by {e.args[0]}{run.after_stop(started, train.resume_command)}", file=sys.stderr)
        return 128 + e.signum
    if outcome.report is not None:
        print(outcome.report)
        print(f"run folder: {outcome.run_dir} ({', '.join(outcome.written)})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mamlkit.loop import run

    request = run.RLEval(args.checkpoint, eval_tasks=args.eval_tasks, eval_traj=args.eval_traj,
                         eval_lrs=tuple(args.eval_lrs) if args.eval_lrs is not None else None,
                         steps=tuple(args.steps) if args.steps is not None else None,
                         baselines=not args.no_baselines, eval_episodes=args.eval_episodes, out=args.out,
                         overwrite=args.overwrite, last=args.last, threads=args.threads)
    out, written = run.rl_eval_run(request)
    print(f"report: {out} ({', '.join(written)})")
    return 0


class _GoalAction(argparse.Action):
    """``--goal``: two numbers (nav2d) or three (Meta-World), refused by the parser otherwise."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) not in (2, 3):
            parser.error(f"argument --goal: expected 2 arguments (X Y, nav2d) or 3 (X Y Z, Meta-World), "
                         f"got {len(values)}")
        setattr(namespace, self.dest, values)


def cmd_adapt(args: argparse.Namespace) -> int:
    from mamlkit.loop import run

    request = run.RLAdapt(args.checkpoint, goal=tuple(args.goal) if args.goal is not None else None,
                          test_task=args.test_task, task_type=args.task_type, steps=args.steps, traj=args.traj,
                          out=args.out, seed=args.seed, threads=args.threads, video=args.video)
    for line in run.rl_adapt_run(request):
        print(line)
    return 0


def main(args: argparse.Namespace) -> int:
    """Dispatch ``mamlkit rl ...``; called by :func:`mamlkit.cli.main`."""
    return {"train": cmd_train, "eval": cmd_eval, "adapt": cmd_adapt}[args.rl_command](args)
