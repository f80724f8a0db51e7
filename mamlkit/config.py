"""Run configuration: one frozen, keyword-only dataclass, checked on construction.

Every field is a CLI flag (``inner_lr`` → ``--inner-lr``) and a YAML key. The generic fields are declared
here; the settings that only some algorithms or task families read are declared by those plug-ins as options
classes (:mod:`mamlkit.base.options`), and a config holds the options of the algorithm and family it names
(``options``), read as if they were its own fields (``cfg.msl``). Presets (:mod:`mamlkit.presets`) fill it
with a paper's setting; a YAML file and flags override.

The functions below take the config class: ``mamlkit.rl.config.RLConfig`` is built by them too, choosing an RL
algorithm and an environment family (each class's ``choices``, a :class:`Choices`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mamlkit.base import options as plugins
from mamlkit.base.choices import STRATEGIES, bad_choice
from mamlkit.base.limits import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, check_fields
from mamlkit.base.options import EXECUTION, GROUPS, INNER, LOGGING, MODEL, OUTER, TASK, ConfigError, need

# ``--output``: a key or attribute name (an identifier) or an index, bounded
_OUTPUT = r"-?\d{1,6}|[A-Za-z_]\w{0,99}"


def flag(default: Any, group: str, help: str, groups: tuple[str, ...] = GROUPS) -> Any:
    """A config field with its CLI group and help line (:func:`mamlkit.base.options.option`); ``group`` is one
    of ``groups``, the help groups of the config's command (``mamlkit rl train`` has its own)."""
    return plugins.option(default, group, help, groups)


def option_attribute(cfg: Any, name: str) -> Any:
    """``cfg.name`` for an option of the chosen plug-ins (``cfg.msl``); an option of another plug-in of the config's
    kinds reads as its default, the value it has for every run that does not choose that plug-in."""
    if name.startswith("__") or name == "options":
        raise AttributeError(name)
    for opts in cfg.__dict__.get("options", ()):
        if name in opts.__dataclass_fields__:
            return getattr(opts, name)
    owner = plugins.owner(name, type(cfg).choices.kinds)
    if owner is None:
        raise AttributeError(f"{type(cfg).__name__!r} object has no attribute {name!r}")
    return owner.__dataclass_fields__[name].default


@dataclass(frozen=True, kw_only=True, init=False)
class TrainConfig:
    """Everything that defines a run. Defaults are the paper's sinusoid setting (Finn et al. 2017).

    ``TrainConfig(task=..., msl=...)`` takes the generic fields and the options of the chosen algorithm and
    task family by name; an option of a plug-in not chosen is refused, naming its flag.
    """

    # what to learn
    task: str = flag("sinusoid", TASK, "task family: sinusoid, omniglot, miniimagenet, clinc, csv, images")
    algo: str = flag("maml", OUTER, "meta-learning algorithm: maml, fomaml, anil, metasgd, mamlpp, reptile, imaml, "
                     "pretrain (`mamlkit algos`)")
    loss: str = flag("mse", TASK, "task loss: mse (regression) | cross_entropy (classification)")
    model: str = flag("", MODEL, "the model: '' the task's own | package.module:factory (your nn.Module) | a Hugging "
                      "Face folder or hf:ID (offline)")
    model_args: str = flag("", MODEL, "JSON object: keyword arguments of --model's factory or Hugging Face wrapper")
    output: str = flag("", MODEL, "the tensor of the model's output the loss takes: '' the tensor itself, or a "
                       "ModelOutput's or dict's logits | a key or attribute (logits) | an index (0)")
    # episodes
    k_shot: int = flag(10, TASK, "support examples per class (per task for regression)")
    k_query: int = flag(10, TASK, "query examples per class (per task for regression)")
    # inner loop
    inner_lr: float = flag(0.01, INNER, "α, the inner SGD step size")
    inner_steps: int = flag(1, INNER, "K, inner steps per task during meta-training")
    test_inner_steps: int | None = flag(None, INNER, "inner steps at evaluation and adapt (none: inner_steps)")
    # outer loop
    meta_batch: int = flag(25, OUTER, "tasks per meta-iteration")
    meta_lr: float = flag(1e-3, OUTER, "β, the meta step size (Adam by default)")
    iterations: int = flag(70_000, OUTER, "meta-iterations (outer steps) to train for")
    # execution
    strategy: str = flag("auto", EXECUTION, "how tasks are batched: auto (measured on the first batch) | vmap | loop | "
                         "threads | compile")
    chunk_size: int = flag(0, EXECUTION, "tasks per backward chunk (0: the whole batch for vmap)")
    memory_budget: float = flag(0.0, EXECUTION, "MB of tensors a meta-iteration may hold; vmap runs in chunks that "
                                "fit (0: no limit)")
    device: str = flag("cpu", EXECUTION, "torch device: cpu, cuda, cuda:1, ...")
    dtype: str = flag("float32", EXECUTION, "float32 | float64")
    threads: int = flag(0, EXECUTION, "torch threads (0: the trainer chooses: one intra-op thread, the cores to "
                       "whole tasks)")
    tune_malloc: bool = flag(True, EXECUTION, "let glibc keep freed memory for reuse: fewer page faults, ~+10% RSS")
    fast_kernels: bool = flag(True, EXECUTION, "compiled CPU kernels for NCHW max-pool and batch norm")
    backend: str = flag("auto", EXECUTION, "torchrun backend: auto (nccl on CUDA, else gloo) | gloo | nccl")
    dist_timeout: int = flag(600, EXECUTION, "seconds a collective waits for the other ranks before the job fails")
    seed: int = flag(0, TASK, "seed of every random choice: task k depends only on (seed, split, k)")
    # logging, validation, checkpoints
    out_dir: str = flag("runs", LOGGING, "folder that receives the run folder")
    run_name: str = flag("", LOGGING, "the run folder's name (empty: <preset or task>-<algo>)")
    log_every: int = flag(100, LOGGING, "log the training loss every N iterations")
    val_every: int = flag(2_000, LOGGING, "validate on val_tasks held-out tasks every N iterations")
    val_tasks: int = flag(100, LOGGING, "tasks per validation (0: no validation)")
    checkpoint_every: int = flag(5_000, LOGGING, "write a checkpoint every N iterations (and at the end)")
    progress: bool = flag(True, LOGGING, "show a progress bar with the live loss")
    tensorboard: bool = flag(True, LOGGING, "also write TensorBoard logs (needs `pip install tensorboard`)")
    # final evaluation
    eval_tasks: int = flag(600, LOGGING, "fixed test tasks of the final evaluation")
    eval_steps: tuple[int, ...] = flag((0, 1, 5, 10), LOGGING, "inner steps at which the evaluation reports")
    test_guard: bool = flag(False, LOGGING, "evaluation adapts with step halving when the support loss rises (the "
                            "guarded table); default: the paper's plain SGD")
    compare_pretrained: bool = flag(True, LOGGING, "also train the pretrained baseline and compare it")
    baseline_lrs: tuple[float, ...] = flag((), LOGGING, "step sizes tried for fine-tuning the pretrained baseline: "
                                           "the one with the lowest validation loss is used (empty: inner_lr)")
    preset: str = flag("", TASK, "the preset this config started from (informational)")
    # outer meta-rate schedule, applied by the trainer every iteration
    meta_optimizer: str = flag("adam", OUTER, "adam | sgd (Reptile's outer step θ ← θ + ε(φ̄ − θ) is SGD at ε)")
    meta_lr_schedule: str = flag("constant", OUTER, "meta rate schedule to min_meta_lr: constant | cosine (MAML++) | "
                                 "linear (Reptile)")
    min_meta_lr: float = flag(0.0, OUTER, "the schedule's final meta rate")
    # the options of the chosen algorithm and task family (mamlkit.base.options), in that order
    options: tuple[Any, ...] = dataclasses.field(default=())

    def __init__(self, **values: Any) -> None:
        fill(self, values, loose=())

    __getattr__ = option_attribute  # cfg.msl: an option of the chosen plug-ins, else its default

    def __post_init__(self) -> None:
        check_values(self)

        need(_json_object(self.model_args) is not None,
             f"model_args must be a JSON object such as '{{\"hidden\": 64}}', got {_shown(self.model_args)}")
        need(self.output == "" or re.fullmatch(_OUTPUT, self.output) is not None,
             f"output must be a key or attribute name of the model's output (logits) or an index (0), got "
             f"{self.output[:80]!r}")
        need(self.loss in ("mse", "cross_entropy"), f"loss must be 'mse' or 'cross_entropy', got {self.loss!r}")
        msg = bad_choice("strategy", self.strategy, STRATEGIES)
        need(msg is None, msg or "")
        need(self.memory_budget >= 0, f"memory_budget must be >= 0 MB (0: no limit), got {self.memory_budget}")
        need(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        need(self.backend in ("auto", "gloo", "nccl"),
             f"backend must be auto, gloo or nccl, got {self.backend!r}")
        need(self.backend != "nccl" or self.device.startswith("cuda"),
             f"backend nccl needs --device cuda, got device {self.device!r}; use gloo (or auto) on the CPU")
        need(self.dist_timeout >= 1, f"dist_timeout must be >= 1 second, got {self.dist_timeout}")
        for name in ("k_shot", "k_query", "meta_batch", "iterations", "log_every", "val_every",
                     "checkpoint_every", "eval_tasks"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_steps", "chunk_size", "threads", "val_tasks"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.test_inner_steps is None or self.test_inner_steps >= 0, "test_inner_steps must be >= 0")
        need(self.inner_lr >= 0, f"inner_lr must be >= 0, got {self.inner_lr}")
        need(all(math.isfinite(r) and r > 0 for r in self.baseline_lrs),
             f"baseline_lrs must be positive step sizes, got {self.baseline_lrs}")
        self._check_schedule()
        need(all(s >= 0 for s in self.eval_steps) and len(self.eval_steps) > 0,
             f"eval_steps must be non-negative step counts, got {self.eval_steps}")
        check_options(self)

    def _check_schedule(self) -> None:
        need(self.meta_lr > 0, f"meta_lr must be > 0, got {self.meta_lr}")
        need(self.meta_optimizer in ("adam", "sgd"),
             f"meta_optimizer must be adam or sgd, got {self.meta_optimizer!r}")
        need(self.meta_lr_schedule in ("constant", "cosine", "linear"),
             f"meta_lr_schedule must be constant, cosine or linear, got {self.meta_lr_schedule!r}")
        need(0 <= self.min_meta_lr <= self.meta_lr,
             f"min_meta_lr must be in [0, meta_lr], got {self.min_meta_lr}")

    @property
    def output_spec(self) -> str | int | None:
        """``output`` as the learners take it (:mod:`mamlkit.engine.outputs`): None, an index or a key."""
        if not self.output:
            return None
        return int(self.output) if re.fullmatch(r"-?\d+", self.output) else self.output

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """``model_args`` parsed: the keyword arguments of a user's model factory."""
        return _json_object(self.model_args) or {}

    @property
    def eval_inner_steps(self) -> int:
        return self.inner_steps if self.test_inner_steps is None else self.test_inner_steps

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping of every generic field and every option of the chosen plug-ins (config.json, YAML
        keys, checkpoints): the keys are the flags' names."""
        return flat_dict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """This config with ``changes``; options of this config that a newly chosen plug-in does not read are
        dropped, while a change it does not read is refused."""
        return replaced(self, changes)


@dataclass(frozen=True)
class Choices:
    """How a config class chooses its plug-ins, whose options it holds (:mod:`mamlkit.base.options`): ``kinds``,
    the kinds of plug-in its command takes the options of; ``chosen(cfg)``, the ``(kind, name)`` of each plug-in
    the config's generic fields choose, in the order its options are held; ``what``, how messages name its keys.
    One set of functions below serves every config class through its ``choices`` (no base class)."""

    kinds: tuple[str, ...]
    chosen: Callable[[Any], tuple[tuple[str, str], ...]]
    what: str = "config"


TrainConfig.choices = Choices(("algo", "task"), lambda cfg: (("algo", cfg.algo), ("task", cfg.task)))


def check_values(cfg: Any) -> None:
    """The checks of every config class that come first: finite floats (options too: given as instances, they
    were not checked before), every count and size below its bound (:mod:`mamlkit.base.limits`)."""
    refuse_non_finite(cfg)
    for opts in cfg.options:
        refuse_non_finite(opts)
    check_fields(cfg.to_dict())


def check_options(cfg: Any) -> None:
    """The chosen plug-ins' checks across generic fields (MAML++: inner_steps >= 1), after the generic ones."""
    for opts in cfg.options:
        check = plugins.hook(opts, "check")
        if check is not None:
            check(cfg)


def flat_dict(cfg: Any) -> dict[str, Any]:
    """A config's flat mapping: its generic fields, then the options of its plug-ins (config.json's keys)."""
    values = as_dict(cfg)
    del values["options"]
    for opts in cfg.options:
        values.update(as_dict(opts))
    return values


def replaced(cfg: Any, changes: dict[str, Any]) -> Any:
    """``cfg`` with ``changes`` (:meth:`TrainConfig.replace`): its options a newly chosen plug-in does not read
    are dropped, a change it does not read is refused."""
    values = cfg.to_dict()
    return from_dict({**values, **changes}, loose=set(values) - set(changes), cls=type(cfg))


def _generic(cls: type = TrainConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}


def _classes_of(chosen: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    return tuple(dict.fromkeys(c for kind, name in chosen for c in plugins.options_of(kind, name)))


def chosen_options(algo: str, task: str) -> tuple[type, ...]:
    """The options classes a config for ``algo`` and ``task`` holds: the algorithm's, then the family's."""
    return _classes_of((("algo", algo), ("task", task)))


def fill(cfg: Any, values: dict[str, Any], loose: Iterable[str]) -> None:
    """Set ``cfg``'s fields from ``values`` (generic fields and the chosen plug-ins' options by name), drop the
    options in ``loose`` that the chosen plug-ins do not read, refuse the others, then check it all."""
    values = dict(values)
    cls = type(cfg)
    generic = _generic(cls)
    kinds = cls.choices.kinds
    unknown = sorted(k for k in values if k not in generic and k != "options" and plugins.owner(k, kinds) is None)
    if unknown:
        raise ConfigError(f"unknown {cls.choices.what} key(s): {', '.join(unknown)}. Valid keys: "
                          f"{', '.join(field_types(cls))}")
    given = values.pop("options", None)
    for name, f in generic.items():
        object.__setattr__(cfg, name, values.pop(name) if name in values else f.default)
    chosen = cls.choices.chosen(cfg)
    classes = _classes_of(chosen) if given is None else tuple(type(o) for o in given)
    owned = {f.name for c in classes for f in dataclasses.fields(c)}
    _refuse_unowned(sorted(set(values) - owned - set(loose)), chosen)
    _refuse_non_finite_values(values)  # before an option's own checks, which an infinity or a NaN may pass
    opts = tuple(given) if given is not None else tuple(
        c(**{f.name: values[f.name] for f in dataclasses.fields(c) if f.name in values}) for c in classes)
    object.__setattr__(cfg, "options", opts)
    for o in opts:  # generic values a plug-in sets from its options (a CSV task's loss from its kind)
        derived = plugins.hook(o, "derived")
        for name, value in (derived() if derived is not None else {}).items():
            object.__setattr__(cfg, name, value)
    cfg.__post_init__()


def check_owned(cfg: Any, names: Iterable[str]) -> None:
    """Refuse the options in ``names`` that ``cfg``'s chosen plug-ins (its algorithm and task family, or RL
    algorithm and environment family) do not read (a resumed run's overrides, before anything else is said
    about them)."""
    owned = {f.name for o in cfg.options for f in dataclasses.fields(o)}
    kinds = type(cfg).choices.kinds
    _refuse_unowned(sorted(n for n in names if plugins.owner(n, kinds) is not None and n not in owned),
                    type(cfg).choices.chosen(cfg))


def _refuse_unowned(names: list[str], chosen: tuple[tuple[str, str], ...]) -> None:
    """Refuse the options in ``names``, which none of the ``chosen`` plug-ins reads, naming their flags and the
    chosen plug-in's own settings of that kind: every flag takes effect or is refused, none is ignored."""
    for kind, name in reversed(chosen):  # the family's first, then the algorithm's
        label, works = plugins.KINDS[kind]
        mine = [n for n in names if plugins.users(plugins.owner(n), (kind,))]
        if mine:
            own = [f.name for c in plugins.options_of(kind, name) for f in dataclasses.fields(c)]
            readers = {n: [u for _, u in plugins.users(plugins.owner(n), (kind,))] for n in mine}
            where = "; ".join(works.format(flag=n.replace("_", "-"), users=_or(users))
                              for n, users in sorted(readers.items()))
            label = label.format(name)
            if not plugins.registered(kind, name):
                label += " (no plug-in is registered under that name)"
            refuse_unused(mine, own, label, where)


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def refuse_non_finite(cfg: Any) -> None:
    """Refuse a NaN or infinite value in any float field of the config dataclass ``cfg`` (tuples entry by
    entry), naming its flag. One rule for every field, present and future: an infinite step size or scale
    passes every ``>= 0`` check below and would train on NaN or give constant results without a word."""
    _refuse_non_finite_values({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def _refuse_non_finite_values(values: dict[str, Any]) -> None:
    """:func:`refuse_non_finite` for fields given by name (an options class's, before its own checks run)."""
    for name, value in values.items():
        entries = value if isinstance(value, tuple) else (value,)
        bad = [v for v in entries if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            what = "finite numbers" if isinstance(value, tuple) else "a finite number"
            raise ConfigError(f"--{name.replace('_', '-')} ({name}) must be {what}, got "
                              f"{' '.join(map(str, entries))}")


def refuse_unused(names: Iterable[str], own: Iterable[str], owner: str, where: str = "") -> None:
    """Refuse the options ``names`` (set by the user: flags, YAML keys, keyword arguments) that ``owner`` (the
    chosen algorithm or task family) does not read, naming the flags, ``own``, its own settings of that kind,
    and ``where`` they do take effect."""
    unused = sorted(names)
    if unused:
        one = len(unused) == 1
        flags = ", ".join("--" + f.replace("_", "-") for f in unused)
        own = ", ".join("--" + f.replace("_", "-") for f in sorted(own)) or "none"
        raise ConfigError(f"{flags} {'has' if one else 'have'} no effect on {owner}, so "
                          f"{'it is' if one else 'they are'} refused; remove {'it' if one else 'them'}. Its own "
                          f"settings of this kind: {own}" + (f". {where}" if where else ""))


def _shown(text: str, most: int = 80) -> str:
    """``text`` quoted for a message, cut to ``most`` characters (a file's value may be megabytes)."""
    return repr(text) if len(text) <= most else f"{text[:most]!r}... ({len(text):,} characters)"


def _json_object(text: str) -> dict[str, Any] | None:
    """``text`` as a JSON object (``{}`` for ''), or None when it is not one."""
    import json

    if not text.strip():
        return {}
    if len(text) > MAX_CONFIG_BYTES:  # as large as a whole config may be
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        return None
    return value if isinstance(value, dict) else None


def field_types(cls: type = TrainConfig) -> dict[str, Any]:
    """The type of every key of config class ``cls``: its generic fields, then every option of its kinds'
    plug-ins."""
    types_ = typing.get_type_hints(cls)
    del types_["options"]
    for option_cls in plugins.option_classes(cls.choices.kinds):
        types_.update(typing.get_type_hints(option_cls))
    return types_


def _coerce(name: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(a for a in args if a is not type(None))
        return _coerce(name, value, typ)
    if origin is tuple:
        if isinstance(value, (int, float, str)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(name, v, args[0]) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    try:
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {typ.__name__}, got {value!r}") from None


def as_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (tuples become lists)."""
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v)
            for f in dataclasses.fields(cfg)}


def from_dict(values: dict[str, Any], loose: Iterable[str] = (), cls: type = TrainConfig) -> Any:
    """Build a config of class ``cls`` from a flat dict (:meth:`TrainConfig.to_dict`'s keys), rejecting unknown
    keys with the list of valid ones. Options of a plug-in the config does not choose are refused, but those
    named in ``loose`` (a preset's values, the rest of a replaced config) are dropped."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown {cls.choices.what} key(s): {', '.join(unknown)}. Valid keys: {', '.join(types_)}")
    cfg = object.__new__(cls)
    fill(cfg, {k: _coerce(k, v, types_[k]) for k, v in values.items()}, loose)
    return cfg


def from_stored(values: dict[str, Any], cls: type = TrainConfig) -> Any:
    """The config a run stored (config.json, a checkpoint's state). Files written when every option was a field
    of every config hold the options of plug-ins the run did not choose: those at their default are dropped,
    any other value is refused, since the stored run would silently change meaning."""
    types_ = field_types(cls)
    generic = _generic(cls)
    kinds = cls.choices.kinds
    probe = types.SimpleNamespace(**{n: _coerce(n, values[n], types_[n]) if n in values else f.default
                                     for n, f in generic.items()})
    chosen = cls.choices.chosen(probe)
    owned = {f.name for c in _classes_of(chosen) for f in dataclasses.fields(c)}
    stray = [k for k in values if k not in generic and k not in owned and plugins.owner(k, kinds) is not None]
    changed = sorted(k for k in stray
                     if _coerce(k, values[k], types_[k]) != plugins.owner(k).__dataclass_fields__[k].default)
    if changed:
        readers = " and ".join(plugins.KINDS[kind][0].format(name) for kind, name in chosen)
        raise ConfigError(f"the stored config sets {', '.join(f'{k}={values[k]!r}' for k in changed)}, which "
                          f"{readers} do not read; the run cannot be loaded with that setting ignored. Remove the "
                          "key from its config.json if that is intended")
    return from_dict({k: v for k, v in values.items() if k not in stray}, cls=cls)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping of config overrides: at most MAX_CONFIG_BYTES, nested at most MAX_CONFIG_DEPTH
    deep, and without aliases (``*name``), which expand a few lines into gigabytes ("billion laughs")."""
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more than the bound, whatever the file (a FIFO, /dev/zero)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than the limit of {MAX_CONFIG_BYTES // 2**20} MiB; a config "
                          "holds a few dozen keys")
    try:
        text = raw.decode("utf-8")
        _check_yaml_shape(yaml.parse(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def _check_yaml_shape(events: Any, path: str) -> None:
    """Refuse aliases and nesting deeper than MAX_CONFIG_DEPTH, reading the parser's events (before any
    value is built, so neither an alias's expansion nor the builder's recursion can run away)."""
    import yaml

    depth = 0
    for event in events:
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"config file {path} uses a YAML alias (*{event.anchor}); aliases are refused, since "
                              "they can expand a few lines into gigabytes. Write the value out where it is used")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"config file {path} nests lists or mappings more than {MAX_CONFIG_DEPTH} deep; a "
                                  "config is a flat mapping of keys to values")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


__all__ = ["TrainConfig", "Choices", "ConfigError", "from_dict", "from_stored", "load_yaml", "flag", "GROUPS",
           "field_types", "chosen_options", "fill", "check_owned", "check_values", "check_options", "flat_dict",
           "replaced", "option_attribute"]
