"""The ``mamlkit`` command line. Every config field is a flag; user mistakes exit with code 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import typing
from pathlib import Path

from mamlkit import config
from mamlkit.base.errors import UserError
from mamlkit.presets import PRESETS, preset_config

# Fields that may change when a run is resumed; everything else defines the run.
RESUMABLE = {"iterations", "log_every", "val_every", "checkpoint_every", "progress", "tensorboard", "threads",
             "tune_malloc", "eval_tasks", "eval_steps", "eval_shots", "eval_query", "compare_pretrained",
             "backend", "dist_timeout", "data_root", "trust_checksum"}  # data: verified by checksum


# Tuple fields whose flag may be given several times, each adding to the list.
REPEATABLE = {"adapt"}


def resumed_config(cfg, overrides: dict, allowed: set[str]):
    """``cfg`` with ``overrides`` applied, refusing fields that define the run (only ``allowed`` may change)."""
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise UserError(f"cannot change {', '.join(bad)} when resuming; these may change: "
                        f"{', '.join(sorted(allowed))}")
    return cfg.replace(**overrides)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def add_config_flags(parser: argparse.ArgumentParser, cls: type = config.TrainConfig,
                     title: str = "config fields (override the preset and --config)", skip: tuple[str, ...] = ()
                     ) -> None:
    """One flag per field of the config dataclass ``cls`` (but ``skip``); unset flags stay out of the
    namespace, so only what the user typed overrides the preset or YAML file."""
    group = parser.add_argument_group(title)
    defaults = cls()
    for name, typ in typing.get_type_hints(cls).items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        kw: dict = {"dest": name, "default": argparse.SUPPRESS}
        origin, args = typing.get_origin(typ), typing.get_args(typ)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            # --adapt is repeatable: `--adapt 'head.*' --adapt '*.layer.5.*'` adapts both
            kw |= {"nargs": "+", "type": args[0], **({"action": "extend"} if name in REPEATABLE else {})}
        elif type(None) in args:
            kw |= {"type": _optional_int, "metavar": "INT|none"}
        else:
            kw["type"] = typ
        group.add_argument(flag, help=f"default {getattr(defaults, name)!r}", **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamlkit", description="Exact, fast gradient-based meta-learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the engine's choices")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train from a preset", description="Meta-train from a preset. "
                           "Presets: " + ", ".join(sorted(PRESETS)))
    train.add_argument("preset_name", nargs="?", metavar="PRESET", help="preset name (see `mamlkit presets`)")
    train.add_argument("--config", help="YAML file of config overrides")
    train.add_argument("--resume", metavar="RUN", help="continue the run in this folder or checkpoint")
    add_config_flags(train)

    ev = sub.add_parser("eval", help="evaluate a run or checkpoint on fixed test tasks")
    ev.add_argument("run", help="run folder or checkpoint file")
    ev.add_argument("--baseline", help="run folder of a baseline to compare (default: RUN/pretrained if present)")
    ev.add_argument("--eval-tasks", type=int, help="number of test tasks (default: the run's, 600)")

    from mamlkit import adapt_cli

    adapt_cli.add_parser(sub)
    adapt_cli.add_example_parser(sub)
    sub.add_parser("presets", help="list the presets and the papers they reproduce")
    sub.add_parser("algos", help="list the algorithms")
    from mamlkit.rl.cli import add_parser as add_rl_parser  # meta-RL command group: `mamlkit rl ...`

    add_rl_parser(sub)

    data = sub.add_parser("data", help="download, verify and preprocess a dataset",
                          description="Download (when online and missing), verify the checksums and build "
                          "the preprocessed cache of a dataset. Data root: --data-root, else $MAMLKIT_DATA, "
                          "else ~/.cache/mamlkit; cache: $MAMLKIT_CACHE, else ~/.cache/mamlkit.")
    data.add_argument("dataset", choices=["omniglot", "miniimagenet", "clinc150"])
    data.add_argument("--data-root", default="", help="folder holding (or to receive) the dataset's files")
    data.add_argument("--trust-checksum", action="store_true",
                      help="use files whose checksum matches no known version")
    data.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from mamlkit.eval import reports
    from mamlkit.loop import train

    overrides = {k: v for k, v in vars(args).items() if k in config.field_types()}
    if args.resume:
        trainer = train.load_trainer(args.resume)
        trainer.cfg = resumed_config(trainer.cfg, overrides, RESUMABLE)
    else:
        if not args.preset_name:
            raise UserError("name a preset (`mamlkit train sinusoid`) or pass --resume RUN; presets: "
                            + ", ".join(sorted(PRESETS)))
        file_values = config.load_yaml(args.config) if args.config else {}
        cfg = preset_config(args.preset_name, {**file_values, **overrides})
        trainer = train.new_trainer(cfg, train.run_dir_for(cfg))
    train.fit(trainer)
    cfg = trainer.cfg
    learners = {trainer.learner.name: trainer.learner}
    if cfg.compare_pretrained and cfg.algo != "pretrain":
        learners["pretrain"] = _baseline(trainer).learner
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every rank trains; rank 0 alone evaluates and reports
    print()
    print(reports.report(trainer.run_dir, learners, cfg))
    print(f"run folder: {trainer.run_dir} (checkpoint.safetensors, config.json, metrics.jsonl, eval.md, figures)")
    return 0


def _baseline(trainer):
    """Train (or resume, or load) the paper's pretrained baseline in ``RUN/pretrained``."""
    from mamlkit.loop import train

    folder = trainer.run_dir / "pretrained"
    if (folder / "checkpoint.safetensors").exists():
        baseline = train.load_trainer(folder)
    else:
        cfg = trainer.cfg.replace(algo="pretrain", compare_pretrained=False, run_name="pretrained",
                                  checkpoint_inner=False,
                                  strategy="vmap" if trainer.cfg.strategy == "compile" else trainer.cfg.strategy)
        baseline = train.new_trainer(cfg, folder)
    return train.fit(baseline)


def cmd_eval(args: argparse.Namespace) -> int:
    from mamlkit.eval import reports
    from mamlkit.exec import kernels
    from mamlkit.loop import train

    main = train.load_trainer(args.run)
    kernels.set_enabled(main.cfg.fast_kernels)
    cfg = main.cfg if args.eval_tasks is None else main.cfg.replace(eval_tasks=args.eval_tasks)
    learners = {main.learner.name: main.learner}
    baseline = Path(args.baseline) if args.baseline else main.run_dir / "pretrained"
    if args.baseline or (baseline / "checkpoint.safetensors").exists():
        learners["pretrain"] = train.load_trainer(baseline).learner
    print(reports.report(main.run_dir, learners, cfg))
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
    from mamlkit import data

    if args.dataset == "clinc150":  # issue 9: download (online, when missing) and verify
        from mamlkit.tasks import text

        folder = text.ensure_clinc(args.data_root, download_missing=not args.no_download)
        ds = text.load_clinc(str(folder), args.trust_checksum)
        print(f"clinc150: {folder} verified; {len(ds.texts)} intents in {len(ds.domains)} domains, "
              f"{sum(map(len, ds.texts.values()))} train utterances")
        return 0
    if args.dataset == "omniglot":
        folder = data.ensure_omniglot(args.data_root, download_missing=not args.no_download)
        ds = data.load_omniglot(folder, trust_checksum=args.trust_checksum)
        bg = int(ds.background.sum())
        print(f"omniglot: {folder} verified; {bg} background + {len(ds.names) - bg} evaluation characters, "
              f"images {tuple(ds.images.shape)} uint8, cache {data.cache_root() / 'omniglot'}")
    else:
        from mamlkit.tasks import miniimagenet

        folder = data.dataset_dir("miniimagenet", args.data_root, "train.csv")
        for split in miniimagenet.SPLIT_FILES:
            images, labels = miniimagenet.load_split(folder, split)
            print(f"miniimagenet {split}: {len(labels)} classes, images {tuple(images.shape)} uint8")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with _torchrun_session(args.command):
            return COMMANDS[args.command](args)
    except UserError as e:
        print(f"mamlkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
