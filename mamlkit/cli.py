"""The ``mamlkit`` command line. Every config field is a flag; user mistakes exit with code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from mamlkit import config
from mamlkit.base.errors import DiskFull, Diverged, UserError
from mamlkit.flags import add_config_command, add_config_flags, add_threads_flag, resumed_config
from mamlkit.presets import PRESETS, preset_config

# Fields that may change when a run is resumed; everything else defines the run.
RESUMABLE = {"iterations", "log_every", "val_every", "checkpoint_every", "progress", "tensorboard", "threads",
             "tune_malloc", "eval_tasks", "eval_steps", "eval_shots", "eval_query", "compare_pretrained",
             "baseline_lrs", "test_guard",
             "backend", "dist_timeout", "data_root", "trust_checksum"}  # data: verified by checksum




def _help_preset(argv: list[str]) -> str | None:
    """The preset named in ``mamlkit train PRESET --help``, whose values the help then shows."""
    if len(argv) < 2 or argv[0] != "train" or not {"-h", "--help"} & set(argv):
        return None
    return next((a for a in argv[1:] if a in PRESETS), None)


def build_parser(help_preset: str | None = None, help_env: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``help_preset`` makes `train --help` show that preset's values instead of the defaults,
    ``help_env`` makes `rl train --help` show that environment's."""
    from mamlkit import adapt_cli

    parser = argparse.ArgumentParser(prog="mamlkit", description="Exact, fast gradient-based meta-learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the engine's choices")
    sub = parser.add_subparsers(dest="command", required=True)

    train = add_config_command(
        sub, "train", help="meta-train from a preset",
        usage="mamlkit train [PRESET] [--config FILE] [--resume RUN] [--FIELD VALUE ...]",
        about="Meta-train from a preset. Presets: " + ", ".join(sorted(PRESETS)) + ".",
        values_from=help_preset and f"preset {help_preset}", hint="`mamlkit train PRESET --help` shows a preset's")
    train.add_argument("preset_name", nargs="?", metavar="PRESET", help="preset name (see `mamlkit presets`)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in the run folder (its checkpoints, logs and reports)")
    adapt_cli.add_trust_flag(train, "with --resume: import the model factory the run's checkpoint names (or "
                             "name it: --model package.module:fn); a fresh run: the factory a --config file names")
    if help_preset:
        add_config_flags(train, values=preset_config(help_preset), values_from=help_preset)
    else:
        add_config_flags(train)

    ev = sub.add_parser("eval", help="evaluate a run or checkpoint on fixed test tasks")
    ev.add_argument("run", help="run folder or checkpoint file")
    ev.add_argument("--baseline", help="run folder of a baseline to compare (default: RUN/pretrained if present)")
    ev.add_argument("--eval-tasks", type=int, help="number of test tasks (default: the run's, 600)")
    ev.add_argument("--test-guard", action=argparse.BooleanOptionalAction, default=None,
                    help="adapt with step halving when the support loss rises (the guarded table); default: the "
                    "run's --test-guard, else the paper's plain SGD")
    adapt_cli.add_model_flags(ev)
    ev.add_argument("--out", metavar="DIR", help="write eval.md, eval.json and figures into DIR (default: RUN's "
                    "folder)")
    ev.add_argument("--overwrite", action="store_true", help="replace the report files already there")
    add_threads_flag(ev, "default: the run's --threads")

    adapt_cli.add_parser(sub)
    adapt_cli.add_example_parser(sub)
    sub.add_parser("presets", help="list the presets and the papers they reproduce")
    sub.add_parser("algos", help="list the algorithms")
    from mamlkit.rl.cli import add_parser as add_rl_parser  # meta-RL command group: `mamlkit rl ...`

    add_rl_parser(sub, help_env)

    data = sub.add_parser("data", help="download, verify and preprocess a dataset",
                          description="Download (when online and missing), verify the checksums and build "
                          "the preprocessed cache of a dataset. Data root: --data-root, else $MAMLKIT_DATA, "
                          "else ~/.cache/mamlkit; cache: $MAMLKIT_CACHE, else ~/.cache/mamlkit.")
    data.add_argument("dataset", choices=_DataChoices(), metavar="DATASET",
                      help="a dataset a task family declares (mamlkit's own: omniglot, miniimagenet, clinc150)")
    data.add_argument("--data-root", default="", help="folder holding (or to receive) the dataset's files")
    data.add_argument("--trust-checksum", action="store_true",
                      help="use files whose checksum matches no known version")
    data.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    return parser


class _DataChoices:
    """The datasets task families declare, read when argparse checks a name, so that building the parser
    (``mamlkit --help``) does not import the families and torch."""

    def _names(self) -> list[str]:
        from mamlkit.tasks import data_commands

        return sorted(data_commands())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def cmd_train(args: argparse.Namespace) -> int:
    from mamlkit import runfolder

    run: list[Path] = []  # the run folder, once known: named in the message after a stop signal
    try:
        with runfolder.stop_on_signals():
            return _train(args, run)
    except runfolder.Stopped as e:
        if _is_main_rank():  # under torchrun every rank is stopped; one says so
            print(f"mamlkit: stopped by {e.args[0]}{_after_stop(run)}", file=sys.stderr)
        return 128 + e.signum


def _after_stop(run: list[Path]) -> str:
    """What a stopped `mamlkit train` leaves: a run to resume, or, stopped before the run's first checkpoint
    (preparing data, timing strategies), none, and then no resume command, which could only fail."""
    if not run:
        return " before training began"
    if (run[0] / "checkpoint.safetensors").exists():
        return f"; resume with `{_resume_command(run[0])}`"
    return (f" before the run's first checkpoint: nothing was trained, so {run[0]} holds no run to resume. Run the "
            "same command again to start it; the folder can be used as it is")


def _resume_command(run_dir: Path) -> str:
    """The resume command of the run in ``run_dir``, with its model factory named if it has one."""
    from mamlkit.loop import train

    try:
        model = json.loads((run_dir / "config.json").read_text()).get("model", "")
    except (OSError, ValueError, AttributeError):
        model = ""
    return train.resume_command_for(run_dir, model)


def _is_main_rank() -> bool:
    """Under torchrun, rank 0 alone owns the run folder (locks, clears, reports); elsewhere always."""
    return int(os.environ.get("RANK", "0")) == 0


def _lock(run_dir: Path):
    from mamlkit import runfolder

    return runfolder.lock(run_dir) if _is_main_rank() else contextlib.nullcontext()


def _train(args: argparse.Namespace, run: list[Path]) -> int:
    from mamlkit import adapt_cli, runfolder
    from mamlkit.loop import train

    given = {k: v for k, v in vars(args).items() if k in config.field_types()}
    file_values = config.load_yaml(args.config) if args.config else {}
    # The model code the user allowed on this command line, for every checkpoint the command loads.
    approval = {"model": None, "trust_model_code": args.trust_model_code}
    if args.resume:
        if args.preset_name:
            raise UserError(f"pass either a preset or --resume RUN, not both: a resumed run keeps its own config, "
                            f"so preset {args.preset_name!r} would be ignored")
        if args.overwrite:
            raise UserError("--overwrite starts a fresh run; it cannot be combined with --resume")
        # --model on a resume names the run's own factory again: consent to import it, not a change.
        named = given.pop("model", None)
        adapt_cli.import_from_here(named)
        _check_resumable(Path(args.resume))
        trainer = train.load_trainer(args.resume, model=named, trust_model_code=args.trust_model_code)
        approval["model"] = named
        overrides = {**file_values, **given}  # --config with --resume may hold only what may change
        check_used(trainer.cfg, set(overrides))
        stored, trainer.cfg = trainer.cfg, resumed_config(trainer.cfg, overrides, RESUMABLE)
        asked = trainer.cfg.iterations  # a run past it trains no further: its config keeps what it trained
        trainer.cfg = trainer.cfg.replace(iterations=max(asked, trainer.step))
    else:
        if not args.preset_name:
            raise UserError("name a preset (`mamlkit train sinusoid`) or pass --resume RUN; presets: "
                            + ", ".join(sorted(PRESETS)))
        if "model" in file_values and "model" not in given:  # a file names the code: the user approves it here
            train.approve_model_code([file_values["model"]], f"--config {args.config}",
                                     trust_model_code=args.trust_model_code)
        cfg = preset_config(args.preset_name, {**file_values, **given})
        approval["model"] = train.named_factory(cfg.model)  # named on this command (or allowed just above)
        adapt_cli.import_from_here(approval["model"])
        check_used(cfg, set(file_values) | set(given))
        run_dir = train.run_dir_for(cfg, overwrite=args.overwrite or not _is_main_rank())
    run.append(trainer.run_dir if args.resume else run_dir)
    with _lock(run[0]), contextlib.ExitStack() as planned:  # the lock: for training, baseline and report alike
        if not args.resume:
            if args.overwrite and _is_main_rank():
                runfolder.clear(run_dir)
            trainer = train.new_trainer(cfg, run_dir)
        elif _nothing_left(trainer, stored, asked):
            return 0
        # the run's thread plan (--threads) for training, baseline and report; the caller's settings after
        planned.enter_context(trainer.learner.executor.planned(trainer.cfg.threads))
        _check_before_training(trainer)
        train.fit(trainer)
        cfg = trainer.cfg
        learners, iterations = {trainer.learner.name: trainer.learner}, {trainer.learner.name: trainer.step}
        if cfg.compare_pretrained and cfg.algo != "pretrain":
            baseline = _baseline(trainer, approval)
            learners["pretrain"], iterations["pretrain"] = baseline.learner, baseline.step
        if not _is_main_rank():
            return 0  # under torchrun every rank trains; rank 0 alone evaluates and reports
        print()
        print(_report_of_run(trainer.run_dir, learners, cfg, iterations))
    print(f"run folder: {trainer.run_dir} ({_written(trainer.run_dir)})")
    return 0


def _report_of_run(run_dir: Path, learners: dict, cfg: config.TrainConfig, iterations: dict[str, int]) -> str:
    """The trained run's report (``iterations``: each learner's); a full disk while writing it says that
    training is done and kept."""
    from mamlkit import runfolder
    from mamlkit.eval import reports

    try:
        return reports.report(run_dir, learners, cfg, iterations)
    except Exception as e:
        if not runfolder.no_space(e):
            raise
        raise DiskFull(f"{runfolder.disk_full_message(e)}. Training finished and its checkpoint in {run_dir} "
                       f"is intact: free some space, then `mamlkit eval {run_dir} --overwrite` writes the report"
                       ) from None


def _check_resumable(path: Path) -> None:
    """A folder without a checkpoint holds no run (its run stopped before the first checkpoint): say that,
    and how to start it, rather than "checkpoint not found"."""
    if path.is_dir() and not (path / "checkpoint.safetensors").exists():
        raise UserError(f"{path} holds no checkpoint: its run stopped before the first one, so nothing was trained "
                        "to resume. Start the run again with the command that began it; the folder can be used as "
                        "it is")


# The settings a run's report depends on: a finished run resumed with others is reported again.
REPORTED = ("eval_tasks", "eval_steps", "eval_shots", "eval_query", "compare_pretrained", "baseline_lrs", "test_guard")


def _finished(trainer, stored: config.TrainConfig) -> bool:
    """Whether a resumed run has nothing left to do: trained to its iterations, its baseline (if it has one)
    too, and its report written for exactly these (eval.json's ``iterations``) with the same report settings
    as ``stored`` (the checkpoint's)."""
    from mamlkit import checkpoint

    cfg, run = trainer.cfg, trainer.run_dir
    if trainer.step < cfg.iterations or any(getattr(cfg, f) != getattr(stored, f) for f in REPORTED):
        return False
    done = {trainer.learner.name: trainer.step}
    try:
        if cfg.compare_pretrained and cfg.algo != "pretrain":
            done["pretrain"] = checkpoint.load(run / "pretrained")[1].get("step")
        reported = json.loads((run / "eval.json").read_text(encoding="utf-8")).get("iterations")
    except (OSError, ValueError, AttributeError, UserError):  # whatever is missing or unreadable is redone
        return False
    baseline_done = all(isinstance(s, int) and s >= cfg.iterations for s in done.values())
    return reported == done and baseline_done and (run / "eval.md").exists()


def _nothing_left(trainer, stored: config.TrainConfig, asked: int) -> bool:
    """Whether a resumed run has nothing left to do (:func:`_finished`), saying so; ``asked``: the iterations
    the command asked for, which a run already past them does not go back to (said too)."""
    run, step, cfg = trainer.run_dir, trainer.step, trainer.cfg
    below = f"--iterations {asked} is below the {step} it has trained, and " if asked < step else ""
    if not _finished(trainer, stored):
        if below and _is_main_rank():
            print(f"mamlkit: {below}it trains no further; finishing what it has not done", file=sys.stderr)
        return False
    if _is_main_rank():  # under torchrun every rank finds the same
        print(f"mamlkit: {below}{run} is finished: {step} iterations trained"
              f"{' (its baseline too)' if cfg.compare_pretrained and cfg.algo != 'pretrain' else ''}, report in "
              f"{run / 'eval.md'}: nothing to do. Pass --iterations above {step} to train further, or run "
              f"`mamlkit eval {run} --overwrite` to evaluate it again.")
    return True


def _check_before_training(trainer) -> None:
    """Run now what would otherwise fail only after training: the splits in the order the run uses them
    (training; validation, which also tunes the baseline's step size) and everything the report needs
    (:func:`mamlkit.eval.reports.check`). The families keep what they load, so this costs one task each."""
    from mamlkit.eval import reports
    from mamlkit.loop import train

    cfg = trainer.cfg
    train.check_split(cfg, "train")
    if cfg.val_tasks or (cfg.compare_pretrained and cfg.algo != "pretrain" and cfg.baseline_lrs):
        train.check_split(cfg, "val")
    if _is_main_rank():  # rank 0 alone reports
        reports.check(cfg, trainer.learner.kind)


def _written(folder: Path) -> str:
    """The run's main files that exist, in a fixed order (only what was written is named)."""
    from mamlkit.eval.reports import REPORT_FILES

    names = ("checkpoint.safetensors", "config.json", "metrics.jsonl", "metrics.csv", "tensorboard", *REPORT_FILES)
    return ", ".join(n + "/" * (folder / n).is_dir() for n in names if (folder / n).exists())


def check_used(cfg: config.TrainConfig, given: set[str]) -> None:
    """Refuse the fields the user set that ``cfg``'s task family or algorithm does not read (each declares
    what it reads: ``TaskFamily.uses``, ``algorithms.register(..., uses=)``), naming their flags."""
    from mamlkit.algorithms import ALGORITHM_USES
    from mamlkit.tasks import get_family

    config.refuse_unused(given, config.TASK_FIELDS, get_family(cfg.task).fields(), f"the {cfg.task} task family")
    if "baseline_lrs" in given and not (cfg.compare_pretrained and cfg.algo != "pretrain"):
        raise UserError("--baseline-lrs tunes the pretrained baseline's step size; this run trains no baseline "
                        "(--no-compare-pretrained or --algo pretrain): drop the flag")
    if cfg.algo in ALGORITHM_USES:  # an unknown algorithm is refused by name when the learner is built
        config.refuse_unused(given, config.ALGO_FIELDS, ALGORITHM_USES[cfg.algo], f"--algo {cfg.algo}")


def _baseline(trainer, approval: dict):
    """Train (or resume, or load) the paper's pretrained baseline in ``RUN/pretrained``; ``approval``: the
    model code the user allowed on this command (the baseline's checkpoint names the run's model)."""
    from mamlkit.loop import train

    folder = trainer.run_dir / "pretrained"
    if (folder / "checkpoint.safetensors").exists():
        baseline = train.load_trainer(folder, **approval)
        # the run's settings that may change on a resume, its budget above all: the baseline trains as long as
        # the run (`iterations` of both), and a baseline that trains further has its step size tuned again
        shared = {f: getattr(trainer.cfg, f) for f in RESUMABLE - {"compare_pretrained", "baseline_lrs"}}
        shared["iterations"] = max(shared["iterations"], baseline.step)
        if baseline.step < shared["iterations"]:
            shared["baseline_lrs"] = trainer.cfg.baseline_lrs
        baseline.cfg = baseline.cfg.replace(**shared)
    else:
        # the run's execution settings; the baseline has no inner loop to checkpoint
        cfg = trainer.cfg.replace(algo="pretrain", compare_pretrained=False, run_name="pretrained",
                                  checkpoint_inner=False)
        baseline = train.new_trainer(cfg, folder)
    baseline.resume_dir = trainer.run_dir  # a stop in it resumes the run, which then reports too
    baseline, losses = train.tune_inner_lr(train.fit(baseline), baseline.cfg.baseline_lrs)
    if losses:
        tried = ", ".join(f"{r:g}: {v:.4f}" for r, v in losses.items())
        print(f"pretrained baseline: fine-tuning step size {baseline.cfg.inner_lr:g}, the lowest validation query "
              f"loss after {baseline.cfg.eval_inner_steps} steps on {baseline.cfg.val_tasks} tasks ({tried})")
    return baseline


def cmd_eval(args: argparse.Namespace) -> int:
    from mamlkit import adapt_cli
    from mamlkit.loop import train

    approval = {"model": args.model, "trust_model_code": args.trust_model_code}
    adapt_cli.import_from_here(args.model)
    main = train.load_trainer(args.run, resume=False, **approval)  # no optimiser, step or RNG state needed
    with main.learner.executor.planned(args.threads):  # the trainer's thread plan; the caller's settings after
        return _eval(args, main, approval)


def _eval(args: argparse.Namespace, main, approval: dict) -> int:
    from mamlkit import runfolder
    from mamlkit.eval import reports
    from mamlkit.loop import train

    out = runfolder.report_folder(Path(args.out) if args.out else main.run_dir, reports.REPORT_FILES,
                                  args.overwrite)
    cfg = main.cfg if args.eval_tasks is None else main.cfg.replace(eval_tasks=args.eval_tasks)
    cfg = cfg if args.test_guard is None else cfg.replace(test_guard=args.test_guard)
    learners, steps = {main.learner.name: main.learner}, {main.learner.name: main.step}
    baseline = Path(args.baseline) if args.baseline else main.run_dir / "pretrained"
    if args.baseline or (baseline / "checkpoint.safetensors").exists():
        other = train.load_trainer(baseline, resume=False, **approval)
        learners["pretrain"], steps["pretrain"] = other.learner, other.step
    # the iterations each trained, where known (a shipped model records none)
    print(reports.report(out, learners, cfg, {name: step for name, step in steps.items() if step}))
    print(f"report: {out} ({', '.join(n for n in reports.REPORT_FILES if (out / n).exists())})")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name, p in sorted(PRESETS.items()):
        print(f"{name:22s} {p.summary}\n{'':22s} {p.citation}")
    return 0


def cmd_algos(args: argparse.Namespace) -> int:
    from mamlkit.algorithms import ALGORITHMS

    for name, builder in sorted(ALGORITHMS.items()):
        doc = (builder.__doc__ or sys.modules[builder.__module__].__doc__ or "").strip().splitlines()
        print(f"{name:12s} {doc[0] if doc else ''}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from mamlkit.tasks import data_commands

    print(data_commands()[args.dataset].prepare(args.data_root, args.trust_checksum, not args.no_download))
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from mamlkit.rl.cli import main as rl_main

    return rl_main(args)


def cmd_adapt(args: argparse.Namespace) -> int:
    from mamlkit import adapt_cli

    return adapt_cli.run(args)


def cmd_example(args: argparse.Namespace) -> int:
    from mamlkit import adapt_cli

    return adapt_cli.run_example(args)


COMMANDS = {"adapt": cmd_adapt, "example": cmd_example, "train": cmd_train, "eval": cmd_eval,
            "presets": cmd_presets, "algos": cmd_algos, "data": cmd_data, "rl": cmd_rl}


def _torchrun_session(command: str):
    """Under torchrun, one process group serves the whole command (both trainings); torn down at its end."""
    if "WORLD_SIZE" not in os.environ:
        return contextlib.nullcontext()  # keeps torch out of `mamlkit presets`
    if command != "train" and os.environ["WORLD_SIZE"] != "1":
        raise UserError(f"only `mamlkit train` runs distributed; run `mamlkit {command}` without torchrun "
                        "(every rank would repeat the same work and write the same files)")
    from mamlkit.loop import distributed

    return distributed.session()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from mamlkit.rl.cli import help_env

    parser = build_parser(_help_preset(argv), help_env(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with _torchrun_session(args.command):
            return COMMANDS[args.command](args)
    except UserError as e:
        print(f"mamlkit: error: {e}", file=sys.stderr)
        return 2
    except (DiskFull, Diverged) as e:  # the run started and could not finish: exit 1, the message says why
        print(f"mamlkit: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from mamlkit import runfolder

        if not runfolder.no_space(e):
            raise
        # every write is atomic (or an append a resume cuts back), so whatever it was writing is as it was
        print(f"mamlkit: error: {runfolder.disk_full_message(e)}: free some space and run the command again",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
