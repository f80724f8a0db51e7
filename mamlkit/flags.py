"""Config fields as command-line flags: one flag per field of a config dataclass, with its line of help
under its group, and the rule for what may change when a run is resumed. Shared by ``mamlkit train`` and
``mamlkit rl train``; it lives beside the configs (not in the CLI) so that both command groups can use it."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from mamlkit import config
from mamlkit.base import options as plugins
from mamlkit.base.errors import UserError

# Tuple fields whose flag may be given several times, each adding to the list.
REPEATABLE = {"adapt"}


def resumed_config(cfg, overrides: dict, allowed: set[str]):
    """``cfg`` with ``overrides`` applied, refusing fields that define the run (only ``allowed`` may change). An
    option the run's plug-ins do not read is refused first, naming its owner."""
    config.check_owned(cfg, overrides)
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise UserError(f"cannot change {', '.join(bad)} when resuming; these may change: "
                        f"{', '.join(sorted(allowed))}")
    return cfg.replace(**overrides)


def add_threads_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """``--threads N`` of a command that evaluates or adapts, with ``mamlkit train --threads``'s meaning:
    ``N`` intra-op threads and ``N`` task workers, ``0`` mamlkit's choice (one intra-op thread on the CPU,
    the cores to whole tasks), which keeps a fair share of a busy machine. ``default`` says what the
    command uses when the flag is not given. The process's own settings are given back when it returns."""
    parser.add_argument("--threads", type=_thread_count, metavar="N",
                        help="torch threads, as in `mamlkit train`: N intra-op threads and N task workers; 0: "
                             f"mamlkit chooses (one intra-op thread on the CPU, the cores to whole tasks); {default}")


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--threads takes a count >= 0 (0: mamlkit chooses), got {text!r}")
    return value


def _optional(typ: type) -> Callable[[str], Any]:
    """The parser of an ``X | None`` flag: ``none`` (or ``null``) or a value of ``X``, its real type."""
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else typ(text)
    parse.__name__ = f"{typ.__name__} or none"  # argparse names the type in its "invalid ... value" message
    return parse


class _Help(argparse.HelpFormatter):
    """argparse's help, wrapped at spaces only: a line never ends inside a word (``second-`` / ``order``), so
    that a help line reads, and is found, as written, whatever the owners' names before it."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_config_command(sub: argparse._SubParsersAction, name: str, *, help: str, usage: str, about: str,
                       values_from: str | None, hint: str) -> argparse.ArgumentParser:
    """The parser of a command whose flags are config fields (``mamlkit train``, ``mamlkit rl train``): a
    wide help column, ``--config FILE`` and ``--resume RUN``, and a description that says whose values the
    brackets show (``values_from``'s, else the defaults, with ``hint`` on how to see another's)."""
    shown = (f"The values in brackets are {values_from}'s." if values_from
             else f"The values in brackets are the defaults; {hint}.")
    parser = sub.add_parser(name, help=help, usage=usage,
                            formatter_class=lambda prog: _Help(prog, max_help_position=30),
                            description=f"{about} Every config field is a flag, and a key of the --config file. "
                                        f"{shown}")
    parser.add_argument("--config", metavar="FILE", help="YAML file of config overrides")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder or checkpoint")
    return parser


def add_config_flags(parser: argparse.ArgumentParser, cls: type = config.TrainConfig,
                     title: str = "config fields (override the preset and --config)", skip: tuple[str, ...] = (),
                     values: object | None = None, values_from: str = "default",
                     groups: tuple[str, ...] = config.GROUPS) -> None:
    """One flag per field of the config dataclass ``cls`` (but ``skip``) and per option of every registered plug-in
    of its kinds (``cls.choices``, :mod:`mamlkit.base.options`); unset flags stay out of the namespace, so
    only what the user typed overrides the preset or YAML file.

    Fields with ``group``/``help`` metadata (:func:`mamlkit.config.flag`) get their line of help under
    their group, in ``groups`` order (``cls``'s groups: :data:`mamlkit.config.GROUPS` for TrainConfig); an
    option's help starts with the plug-ins that read it (``mamlpp: ...``). Each help ends with the field's
    value in ``values`` (default: ``cls()``), labelled ``values_from`` (a preset's name shows its values).
    """
    values = cls() if values is None else values
    fields = {f.name: (f, typing.get_type_hints(cls)[f.name], "") for f in dataclasses.fields(cls)
              if f.name not in skip and f.name != "options"}
    kinds = cls.choices.kinds
    for option_cls in plugins.option_classes(kinds):
        owners = ", ".join(name for _, name in plugins.users(option_cls, kinds))
        hints = typing.get_type_hints(option_cls)
        fields |= {f.name: (f, hints[f.name], f"{owners}: ") for f in dataclasses.fields(option_cls)
                   if f.name not in skip}
    groups = {g: parser.add_argument_group(g) for g in groups
              if any(f.metadata.get("group") == g for f, _, _ in fields.values())}
    fallback = None
    for name, (f, typ, owners) in fields.items():
        value = getattr(values, name)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else repr(value)
        if f.metadata.get("group") in groups:
            group = groups[f.metadata["group"]]
            text = f"{owners}{f.metadata['help']} [{values_from}: {shown}]"
        else:
            fallback = fallback or parser.add_argument_group(title)
            group, text = fallback, f"{values_from} {shown}"
        group.add_argument("--" + name.replace("_", "-"), help=text.replace("%", "%%"), **_argument(name, typ))


def _argument(name: str, typ: Any) -> dict[str, Any]:
    """The ``add_argument`` keywords of the flag of field ``name`` of type ``typ``."""
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is tuple:
        # --adapt is repeatable: `--adapt 'head.*' --adapt '*.layer.5.*'` adapts both
        kw |= {"nargs": "+", "type": args[0], "metavar": METAVARS.get(args[0], "V"),
               **({"action": "extend"} if name in REPEATABLE else {})}
    elif type(None) in args:
        real = next(a for a in args if a is not type(None))
        kw |= {"type": _optional(real), "metavar": f"{METAVARS.get(real, 'V')}|none"}
    else:
        kw |= {"type": typ, "metavar": METAVARS.get(typ, "V")}
    return kw


METAVARS = {int: "N", float: "X", str: "S"}
