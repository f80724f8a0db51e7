"""The ``mamlkit`` command line. Every config field is a flag; user mistakes exit with code 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from mamlkit import config
from mamlkit.base.errors import DiskFull, Diverged, UserError
from mamlkit.flags import add_config_command, add_config_flags, add_threads_flag
from mamlkit.presets import PRESETS, preset_config


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
    from mamlkit.loop import run

    started: list[Path] = []  # the run folder, once known: named in the message after a stop signal
    try:
        with runfolder.stop_on_signals():
            return _train(args, started)
    except runfolder.Stopped as e:
        if run.is_main_rank():  # under torchrun every rank is stopped; one says so
            print(f"mamlkit: stopped by {e.args[0]}{run.after_stop(started)}", file=sys.stderr)
        return 128 + e.signum


def _train(args: argparse.Namespace, started: list[Path]) -> int:
    from mamlkit.loop import run

    given = {k: v for k, v in vars(args).items() if k in config.field_types()}
    file_values = config.load_yaml(args.config) if args.config else {}
    if args.resume:
        if args.preset_name:
            raise UserError(f"pass either a preset or --resume RUN, not both: a resumed run keeps its own config, "
                            f"so preset {args.preset_name!r} would be ignored")
        if args.overwrite:
            raise UserError("--overwrite starts a fresh run; it cannot be combined with --resume")
    elif not args.preset_name:
        raise UserError("name a preset (`mamlkit train sinusoid`) or pass --resume RUN; presets: "
                        + ", ".join(sorted(PRESETS)))
    request = run.Request(preset=args.preset_name, resume=args.resume, given=given, file_values=file_values,
                          config_file=args.config, overwrite=args.overwrite, trust_model_code=args.trust_model_code)
    outcome = run.train_run(request, started)
    if outcome.report is None:
        return 0
    print()
    print(outcome.report)
    print(f"run folder: {outcome.run_dir} ({', '.join(outcome.written)})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mamlkit.loop import run

    out, written = run.eval_run(args.run, baseline=args.baseline, eval_tasks=args.eval_tasks,
                                test_guard=args.test_guard, out=args.out,
                                overwrite=args.overwrite, model=args.model, trust_model_code=args.trust_model_code,
                                threads=args.threads)
    print(f"report: {out} ({', '.join(written)})")
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
    if command not in ("train", "rl train") and os.environ["WORLD_SIZE"] != "1":
        raise UserError(f"only `mamlkit train` runs distributed (and `mamlkit rl train`); run `mamlkit {command}` "
                        "without torchrun (every rank would repeat the same work and write the same files)")
    from mamlkit.loop import distributed

    return distributed.session()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from mamlkit.rl.cli import help_env

    parser = build_parser(_help_preset(argv), help_env(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with _torchrun_session(f"rl {args.rl_command}" if args.command == "rl" else args.command):
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
