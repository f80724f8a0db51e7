"""Plug-in options: each algorithm and task family declares the settings it reads as small frozen dataclasses
of :func:`option` fields, next to its registry line, and registers them here under its name.

A run's config (:class:`mamlkit.config.TrainConfig`) holds the generic settings plus the option values of the
plug-ins it chose; the command-line flags, their help and their groups are generated from the generic fields
and every class registered here. Each field is declared in exactly one class ("every flag has one owner"); a
class shared by several plug-ins (the Conv4 image fields, ``n_way``, ``--adapt``) is listed by each of them.

Configs are data and must not import the plug-ins, and Base imports nothing of the house, so the registry
loads the registering modules itself, by name, on the first lookup: :data:`mamlkit.PLUGINS` lists them (light
modules, so that ``mamlkit train --help`` needs no torch). Code outside the package registers its own
plug-in's options before it builds a config that names it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from typing import Any

from mamlkit.base.errors import UserError


class ConfigError(UserError, ValueError):
    """A user's configuration mistake; the CLI prints it and exits with code 2."""


def need(ok: bool, msg: str) -> None:
    """Refuse a bad config or option value with ``msg``, which names the field and what it takes."""
    if not ok:
        raise ConfigError(msg)

# The groups of `mamlkit train --help`, in order. Each field carries its group and its one line of help
# (dataclass field metadata), so the flags, their help and the config are one list.
TASK, MODEL, INNER, OUTER, EXECUTION, LOGGING = GROUPS = (
    "task and data", "model", "inner loop", "outer loop", "execution", "logging, checkpoints and evaluation")

# The kinds of plug-in that own options, and how messages name them: the chosen one (``{}``: its name), and where
# an option of another plug-in of that kind takes effect (``{flag}``: the option's flag, ``{users}``: its readers).
# `mamlkit train` chooses an algorithm and a task family, `mamlkit rl train` an RL algorithm and an environment
# family (:mod:`mamlkit.rl.families`).
KINDS = {"algo": ("--algo {}", "--{flag} works with --algo {users}"),
         "task": ("the {} task family", "--{flag} works with --task {users}"),
         "rl-algo": ("--algo {}", "--{flag} works with --algo {users}"),
         "env": ("the {} environment family", "--{flag} applies to {users} environments only")}


def option(default: Any, group: str, help: str, groups: tuple[str, ...] = GROUPS) -> Any:
    """A config or options field with its CLI group and help line (``dataclasses.field`` metadata); ``group`` is
    one of ``groups``, the help groups of the config's command (``mamlkit rl train`` has its own)."""
    if group not in groups:
        raise ValueError(f"unknown help group {group!r}; the groups are {', '.join(groups)}")
    return dataclasses.field(default=default, metadata={"group": group, "help": help})


_REGISTRY: dict[tuple[str, str], tuple[type, ...]] = {}  # (kind, plug-in name) -> its options classes
_OWNER: dict[str, type] = {}  # field name -> the one class that declares it
_LOADED: list[bool] = []


def register_options(kind: str, name: str, *classes: type) -> None:
    """Declare that the plug-in ``name`` of ``kind`` (one of :data:`KINDS`) reads the fields of ``classes``
    (frozen dataclasses of :func:`option` fields). Refuses a field that another class already declares, so
    that every flag has one owner, and a field without group or help."""
    if kind not in KINDS:
        raise ValueError(f"unknown plug-in kind {kind!r}; the kinds are {', '.join(KINDS)}")
    for cls in classes:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass of option(...) fields")
        for f in dataclasses.fields(cls):
            if "group" not in f.metadata or "help" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with option(default, group, help)")
            owner = _OWNER.setdefault(f.name, cls)
            if owner is not cls:
                raise ValueError(f"option {f.name!r} of {cls.__qualname__} is already declared by "
                                 f"{owner.__qualname__}: every flag has one owner; list that class instead")
    _REGISTRY[kind, name] = tuple(dict.fromkeys(classes))


def unregister_options(kind: str, name: str) -> None:
    """Forget the plug-in ``name`` of ``kind`` and the fields of its classes that no other plug-in lists (a
    plug-in registered for a while, as a test's)."""
    classes = _REGISTRY.pop((kind, name), ())
    listed = {c for cs in _REGISTRY.values() for c in cs}
    for cls in set(classes) - listed:
        for f in dataclasses.fields(cls):
            if _OWNER.get(f.name) is cls:
                del _OWNER[f.name]


def _load() -> None:
    """Import the registering modules named by :data:`mamlkit.PLUGINS`, once."""
    if not _LOADED:
        _LOADED.append(True)
        import mamlkit

        for module in mamlkit.PLUGINS:
            importlib.import_module(module)


def options_of(kind: str, name: str) -> tuple[type, ...]:
    """The options classes of the plug-in ``name`` of ``kind``; ``()`` for one that registered none."""
    if (kind, name) not in _REGISTRY:
        _load()
    return _REGISTRY.get((kind, name), ())


def registered(kind: str, name: str) -> bool:
    """Whether a plug-in ``name`` of ``kind`` registered its options (none: a misspelt ``--algo`` or ``--task``)."""
    options_of(kind, name)
    return (kind, name) in _REGISTRY


def option_classes(kinds: Iterable[str] | None = None) -> list[type]:
    """Every options class registered by a plug-in of ``kinds`` (None: of every kind; a config's kinds: the
    options its command may take), each once, in registration order."""
    _load()
    kinds = None if kinds is None else set(kinds)
    return list(dict.fromkeys(c for (kind, _), classes in _REGISTRY.items() if kinds is None or kind in kinds
                              for c in classes))


def owner(field: str, kinds: Iterable[str] | None = None) -> type | None:
    """The class that declares ``field``, or None when no plug-in (of ``kinds``, if given) has an option of that
    name."""
    _load()
    cls = _OWNER.get(field)
    return cls if cls is not None and (kinds is None or users(cls, kinds)) else None


def users(cls: type, kinds: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """The ``(kind, name)`` of every plug-in (of ``kinds``, if given) that lists ``cls``, in registration order."""
    _load()
    kinds = None if kinds is None else set(kinds)
    return [key for key, classes in _REGISTRY.items() if cls in classes and (kinds is None or key[0] in kinds)]


def option_fields(kinds: Iterable[str] | None = None) -> dict[str, dataclasses.Field]:
    """Every registered option field (of the plug-ins of ``kinds``, if given) by name (each has one owner)."""
    return {f.name: f for cls in option_classes(kinds) for f in dataclasses.fields(cls)}


def hook(instance: Any, name: str) -> Callable[..., Any] | None:
    """An options instance's optional hook ``name`` (``check(cfg)``: checks across generic fields;
    ``derived()``: generic values the plug-in sets from its options, such as a CSV task's loss)."""
    return getattr(instance, name, None)


__all__ = ["ConfigError", "need", "GROUPS", "TASK", "MODEL", "INNER", "OUTER", "EXECUTION", "LOGGING", "KINDS",
           "option", "register_options", "unregister_options", "options_of", "option_classes", "registered", "owner",
           "users", "option_fields", "hook"]
