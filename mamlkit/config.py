"""Run configuration: one frozen, keyword-only dataclass, checked on construction.

Every field is a CLI flag (``inner_lr`` → ``--inner-lr``) and a YAML key. Presets
(:mod:`mamlkit.presets`) fill it with a paper's setting; a YAML file and flags override.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mamlkit.base.choices import BN_MODES, STRATEGIES, bad_choice
from mamlkit.base.errors import UserError
from mamlkit.base.limits import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, check_fields
from mamlkit.base.patterns import compile_patterns


class ConfigError(UserError, ValueError):
    """A user's configuration mistake; the CLI prints it and exits with code 2."""


# ``--output``: a key or attribute name (an identifier) or an index, bounded
_OUTPUT = r"-?\d{1,6}|[A-Za-z_]\w{0,99}"

# The groups of `mamlkit train --help`, in order. Each field carries its group and its one line of help
# (dataclass field metadata), so the flags, their help and the config are one list.
TASK, MODEL, INNER, OUTER, EXECUTION, LOGGING = GROUPS = (
    "task and data", "model", "inner loop", "outer loop", "execution", "logging, checkpoints and evaluation")


def flag(default: Any, group: str, help: str, groups: tuple[str, ...] = GROUPS) -> Any:
    """A config field with its CLI group and help line (``dataclasses.field`` metadata); ``group`` is one
    of ``groups``, the help groups of the config's command (``mamlkit rl train`` has its own)."""
    if group not in groups:
        raise ValueError(f"unknown help group {group!r}; the groups are {', '.join(groups)}")
    return dataclasses.field(default=default, metadata={"group": group, "help": help})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a run. Defaults are the paper's sinusoid setting (Finn et al. 2017)."""

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
    adapt: tuple[str, ...] = flag((), INNER, "adapt only parameters whose name matches this glob or regex "
                                  "(repeatable; maml, fomaml, metasgd, pretrain)")
    hidden_sizes: tuple[int, ...] = flag((40, 40), MODEL, "MLP hidden layer widths")
    filters: int = flag(64, MODEL, "Conv4 channels per layer (paper: 64 Omniglot, 32 mini-ImageNet)")
    pool: bool = flag(False, MODEL, "Conv4 with stride-1 convs and 2x2 max-pool (mini-ImageNet) instead of "
                      "stride-2 convs")
    image_size: int = flag(28, MODEL, "image side after preprocessing (Omniglot 28, mini-ImageNet 84)")
    bn_mode: str = flag("transductive", MODEL, "batch norm statistics: transductive (query batch, the paper's) | "
                        "support (support set only)")
    # episodes
    n_way: int = flag(5, TASK, "classes per task (classification)")
    k_shot: int = flag(10, TASK, "support examples per class (per task for regression)")
    k_query: int = flag(10, TASK, "query examples per class (per task for regression)")
    # inner loop
    inner_lr: float = flag(0.01, INNER, "α, the inner SGD step size")
    inner_steps: int = flag(1, INNER, "K, inner steps per task during meta-training")
    test_inner_steps: int | None = flag(None, INNER, "inner steps at evaluation and adapt (none: inner_steps)")
    first_order: bool = flag(False, INNER, "drop second-order terms of the meta-gradient (FOMAML)")
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
    checkpoint_inner: bool = flag(False, EXECUTION, "recompute inner steps in the backward: memory flat in "
                                  "inner_steps, more time")
    device: str = flag("cpu", EXECUTION, "torch device: cpu, cuda, cuda:1, ...")
    dtype: str = flag("float32", EXECUTION, "float32 | float64")
    threads: int = flag(0, EXECUTION, "torch threads (0: the trainer chooses: one intra-op thread, the cores to "
                       "whole tasks)")
    tune_malloc: bool = flag(True, EXECUTION, "let glibc keep freed memory for reuse: fewer page faults, ~+10% RSS")
    fast_kernels: bool = flag(True, EXECUTION, "compiled CPU kernels for NCHW max-pool and batch norm")
    backend: str = flag("auto", EXECUTION, "torchrun backend: auto (nccl on CUDA, else gloo) | gloo | nccl")
    dist_timeout: int = flag(600, EXECUTION, "seconds a collective waits for the other ranks before the job fails")
    seed: int = flag(0, TASK, "seed of every random choice: task k depends only on (seed, split, k)")
    # data
    data_root: str = flag("", TASK, "data folder (empty: $MAMLKIT_DATA, else ~/.cache/mamlkit)")
    trust_checksum: bool = flag(False, TASK, "use data files whose checksum matches no known version")
    split: str = flag("paper", TASK, "Omniglot characters: paper (1100/100/423) | background (official)")
    rotations: str = flag("per_task", TASK, "Omniglot rotation classes: per_task | expand | none")
    # tasks from a CSV: a task per distinct value of task_column
    path: str = flag("", TASK, "csv: the CSV file; images: the folder of class folders")
    task_column: str = flag("", TASK, "csv: column whose values name the tasks (patient, asset, site)")
    target: str = flag("", TASK, "csv: column to predict")
    features: tuple[str, ...] = flag((), TASK, "csv: feature columns (none given: every other column)")
    kind: str = flag("regression", TASK, "csv: regression (mse) | classification (cross_entropy); sets the loss")
    fill: str = flag("none", TASK, "csv: missing values: none (error naming rows) | drop | mean (meta-train mean)")
    max_categories: int = flag(20, TASK, "csv: one-hot cap for a categorical column (more: an error naming it)")
    task_split: tuple[float, ...] = flag((0.7, 0.15, 0.15), TASK, "csv: fractions of tasks (images: of classes) for "
                                        "train val test")
    small_tasks: str = flag("skip", TASK, "csv: tasks with < k_shot + k_query rows: skip (counted) | error")
    # labelled images (task images)
    channels: int = flag(3, TASK, "images: 1 (grey) | 3 (RGB) input channels")
    small_classes: str = flag("skip", TASK, "images: classes with < k_shot + k_query images: skip (counted) | error")
    # few-shot text (task clinc)
    encoder_mode: str = flag("frozen", MODEL, "clinc: frozen (cached sentence embeddings, adapted head) | finetune "
                             "(the last encoder layers adapt too)")
    finetune_layers: int = flag(1, MODEL, "clinc finetune: how many of the last encoder layers adapt")
    finetune_rate_scale: float = flag(1.0, MODEL, "clinc finetune: layers held as W/c, so inner rate α·c² and meta "
                                      "rate ~c·β")
    text_max_tokens: int = flag(24, MODEL, "clinc finetune: tokens kept per utterance (CLINC: 99% have <= 21)")
    text_per_intent: int = flag(100, TASK, "clinc: the first N of each intent's 100 train utterances")
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
    eval_shots: tuple[int, ...] = flag((5, 10, 20), LOGGING, "regression: support sizes K evaluated")
    eval_query: int = flag(100, LOGGING, "regression: query points per evaluation task (0: K, as many as "
                          "support)")
    test_guard: bool = flag(False, LOGGING, "evaluation adapts with step halving when the support loss rises (the "
                            "guarded table); default: the paper's plain SGD")
    compare_pretrained: bool = flag(True, LOGGING, "also train the pretrained baseline and compare it")
    baseline_lrs: tuple[float, ...] = flag((), LOGGING, "step sizes tried for fine-tuning the pretrained baseline: "
                                           "the one with the lowest validation loss is used (empty: inner_lr)")
    preset: str = flag("", TASK, "the preset this config started from (informational)")
    # MAML family. Outer meta-rate schedule, applied by the trainer every iteration:
    meta_optimizer: str = flag("adam", OUTER, "adam | sgd (Reptile's outer step θ ← θ + ε(φ̄ − θ) is SGD at ε)")
    meta_lr_schedule: str = flag("constant", OUTER, "meta rate schedule to min_meta_lr: constant | cosine (MAML++) | "
                                 "linear (Reptile)")
    min_meta_lr: float = flag(0.0, OUTER, "the schedule's final meta rate")
    # MAML++ (--algo mamlpp, Antoniou et al. 2019); each part can be switched off
    msl: bool = flag(True, OUTER, "mamlpp: multi-step loss with annealed per-step weights")
    msl_epochs: int = flag(10, OUTER, "mamlpp: epochs over which the MSL weights anneal to the last step")
    lslr: bool = flag(True, INNER, "mamlpp: learned per-layer, per-step inner rates")
    per_step_bn: bool = flag(True, INNER, "mamlpp: per-step batch-norm weights and biases")
    first_order_epochs: int = flag(0, OUTER, "mamlpp: first-order meta-gradient for these first epochs")
    epoch_iterations: int = flag(500, OUTER, "mamlpp: iterations per epoch of its schedules (paper: 500)")
    # Reptile (--algo reptile, Nichol et al. 2018): its own inner optimiser
    reptile_inner_optimizer: str = flag("sgd", INNER, "reptile: inner optimiser sgd | adam (paper: Adam, beta1 = 0)")
    reptile_inner_lr: float = flag(0.02, INNER, "reptile: inner step size")
    reptile_inner_steps: int = flag(5, INNER, "reptile: inner steps per task")
    # iMAML (--algo imaml, Rajeswaran et al. 2019); inner SGD uses inner_lr and inner_steps
    imaml_lambda: float = flag(1.0, INNER, "imaml: λ, strength of the proximal term")
    cg_steps: int = flag(5, OUTER, "imaml: conjugate-gradient iterations for the implicit meta-gradient")

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        refuse_non_finite(self)
        check_fields(as_dict(self))  # every count and size below its bound (mamlkit.base.limits)
        compile_patterns(self.adapt)  # bounded, and matched without backtracking (mamlkit.base.patterns)

        need(_json_object(self.model_args) is not None,
             f"model_args must be a JSON object such as '{{\"hidden\": 64}}', got {_shown(self.model_args)}")
        need(self.output == "" or re.fullmatch(_OUTPUT, self.output) is not None,
             f"output must be a key or attribute name of the model's output (logits) or an index (0), got "
             f"{self.output[:80]!r}")
        for pattern in self.adapt:
            need(bool(pattern.strip()), "adapt patterns must not be empty")
        need(not self.adapt or self.algo in ADAPT_ALGOS,
             f"--adapt works with --algo {', '.join(ADAPT_ALGOS)}, not --algo {self.algo} (ANIL adapts its head "
             "by design)")
        need(self.loss in ("mse", "cross_entropy"), f"loss must be 'mse' or 'cross_entropy', got {self.loss!r}")
        for field, options in (("strategy", STRATEGIES), ("bn_mode", BN_MODES)):
            msg = bad_choice(field, getattr(self, field), options)
            need(msg is None, msg or "")
        need(self.memory_budget >= 0, f"memory_budget must be >= 0 MB (0: no limit), got {self.memory_budget}")
        need(not self.checkpoint_inner
             or (self.algo in ("maml", "fomaml") and self.strategy in ("auto", "loop", "threads")),
             "checkpoint_inner works with --algo maml or fomaml and --strategy auto, loop or threads, got "
             f"--algo {self.algo} --strategy {self.strategy}")
        need(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        need(self.split in ("paper", "background"), f"split must be paper or background, got {self.split!r}"
             + (" (the official background/evaluation split is called 'background')"
                if self.split == "vinyals" else ""))
        need(self.rotations in ("per_task", "expand", "none"),
             f"rotations must be per_task, expand or none, got {self.rotations!r}")
        need(self.filters >= 1 and self.image_size >= 8,
             f"filters must be >= 1 and image_size >= 8, got {self.filters} and {self.image_size}")
        need(self.backend in ("auto", "gloo", "nccl"),
             f"backend must be auto, gloo or nccl, got {self.backend!r}")
        need(self.backend != "nccl" or self.device.startswith("cuda"),
             f"backend nccl needs --device cuda, got device {self.device!r}; use gloo (or auto) on the CPU")
        need(self.dist_timeout >= 1, f"dist_timeout must be >= 1 second, got {self.dist_timeout}")
        for name in ("n_way", "k_shot", "k_query", "meta_batch", "iterations", "log_every", "val_every",
                     "checkpoint_every", "eval_tasks"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_steps", "chunk_size", "threads", "val_tasks", "eval_query"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.test_inner_steps is None or self.test_inner_steps >= 0, "test_inner_steps must be >= 0")
        need(self.inner_lr >= 0, f"inner_lr must be >= 0, got {self.inner_lr}")
        need(all(math.isfinite(r) and r > 0 for r in self.baseline_lrs),
             f"baseline_lrs must be positive step sizes, got {self.baseline_lrs}")
        need(self.meta_lr > 0, f"meta_lr must be > 0, got {self.meta_lr}")
        need(self.meta_optimizer in ("adam", "sgd"),
             f"meta_optimizer must be adam or sgd, got {self.meta_optimizer!r}")
        need(self.meta_lr_schedule in ("constant", "cosine", "linear"),
             f"meta_lr_schedule must be constant, cosine or linear, got {self.meta_lr_schedule!r}")
        need(0 <= self.min_meta_lr <= self.meta_lr,
             f"min_meta_lr must be in [0, meta_lr], got {self.min_meta_lr}")
        self._check_plugin_fields(need)
        from mamlkit.tasks import derived_fields  # a family may set fields from others (a CSV task's loss)

        for name, value in derived_fields(self).items():
            object.__setattr__(self, name, value)

    def _check_plugin_fields(self, need: Callable[[bool, str], None]) -> None:
        """The fields that particular algorithms and task families read."""
        for name in ("msl_epochs", "first_order_epochs", "reptile_inner_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epoch_iterations", "cg_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.reptile_inner_optimizer in ("sgd", "adam"),
             f"reptile_inner_optimizer must be sgd or adam, got {self.reptile_inner_optimizer!r}")
        need(self.reptile_inner_lr >= 0, f"reptile_inner_lr must be >= 0, got {self.reptile_inner_lr}")
        need(self.imaml_lambda > 0, f"imaml_lambda must be > 0, got {self.imaml_lambda}")
        need(self.algo != "mamlpp" or self.inner_steps >= 1, "mamlpp needs inner_steps >= 1")
        need(all(s >= 0 for s in self.eval_steps) and len(self.eval_steps) > 0,
             f"eval_steps must be non-negative step counts, got {self.eval_steps}")
        need(all(s >= 1 for s in self.eval_shots) and len(self.eval_shots) > 0,
             f"eval_shots must be positive, got {self.eval_shots}")
        need(all(h >= 1 for h in self.hidden_sizes), f"hidden_sizes must be positive, got {self.hidden_sizes}")
        need(self.kind in ("regression", "classification"),
             f"kind must be regression or classification, got {self.kind!r}")
        need(self.fill in ("none", "drop", "mean"), f"fill must be none, drop or mean, got {self.fill!r}")
        need(self.max_categories >= 1, f"max_categories must be >= 1, got {self.max_categories}")
        need(len(self.task_split) == 3 and all(f >= 0 for f in self.task_split)
             and abs(sum(self.task_split) - 1) < 1e-6,
             f"task_split must be three fractions (train val test) summing to 1, got {self.task_split}")
        need(self.small_tasks in ("skip", "error"),
             f"small_tasks must be skip or error, got {self.small_tasks!r}")
        need(self.channels in (1, 3), f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        need(self.small_classes in ("skip", "error"),
             f"small_classes must be skip or error, got {self.small_classes!r}")
        need(self.encoder_mode in ("frozen", "finetune"),
             f"encoder_mode must be frozen or finetune, got {self.encoder_mode!r}")
        need(1 <= self.finetune_layers <= 6,
             f"finetune_layers must be in 1..6 (MiniLM-L6 has 6 layers), got {self.finetune_layers}")
        need(self.finetune_rate_scale > 0, f"finetune_rate_scale must be > 0, got {self.finetune_rate_scale}")
        need(self.text_max_tokens >= 4, f"text_max_tokens must be >= 4, got {self.text_max_tokens}")
        need(1 <= self.text_per_intent <= 100, f"text_per_intent must be in 1..100, got {self.text_per_intent}")

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
        return as_dict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **changes})


def refuse_non_finite(cfg: Any) -> None:
    """Refuse a NaN or infinite value in any float field of the config dataclass ``cfg`` (tuples entry by
    entry), naming its flag. One rule for every field, present and future: an infinite step size or scale
    passes every ``>= 0`` check below and would train on NaN or give constant results without a word."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            what = "finite numbers" if isinstance(value, tuple) else "a finite number"
            raise ConfigError(f"--{f.name.replace('_', '-')} ({f.name}) must be {what}, got "
                              f"{' '.join(map(str, values))}")


# Fields that only some task families read; each family declares those it uses (``USES`` in its own module,
# ``TaskFamily.uses``), and a run refuses the others when given, instead of ignoring them.
TASK_FIELDS = frozenset({
    "hidden_sizes", "filters", "pool", "image_size", "bn_mode", "n_way", "data_root", "trust_checksum",
    "split", "rotations", "path", "task_column", "target", "features", "kind", "fill", "max_categories",
    "task_split", "small_tasks", "encoder_mode", "finetune_layers", "finetune_rate_scale", "text_max_tokens",
    "text_per_intent", "eval_shots", "eval_query", "channels", "small_classes"})
# Fields that only some algorithms read; each declares those it uses where it registers (``algorithms.register``).
ALGO_FIELDS = frozenset({
    "first_order", "msl", "msl_epochs", "lslr", "per_step_bn", "first_order_epochs", "epoch_iterations",
    "reptile_inner_optimizer", "reptile_inner_lr", "reptile_inner_steps", "imaml_lambda", "cg_steps", "adapt"})


def refuse_unused(given: set[str], dependent: frozenset[str], used: frozenset[str], owner: str) -> None:
    """Refuse the fields in ``given`` (set by the user: flags, YAML keys) that depend on a task family or an
    algorithm (``dependent``) but that ``owner`` does not read (``used``), naming the flags: every flag takes
    effect or is refused, none is silently ignored."""
    unused = sorted((set(given) & dependent) - used)
    if unused:
        one = len(unused) == 1
        flags = ", ".join("--" + f.replace("_", "-") for f in unused)
        own = ", ".join("--" + f.replace("_", "-") for f in sorted(used)) or "none"
        raise ConfigError(f"{flags} {'has' if one else 'have'} no effect on {owner}, so "
                          f"{'it is' if one else 'they are'} refused; remove {'it' if one else 'them'}. Its own "
                          f"settings of this kind: {own}")


# The algorithms whose adapted set ``--adapt`` chooses (the others fix it: ANIL its head, Reptile all).
ADAPT_ALGOS = ("maml", "fomaml", "metasgd", "pretrain")


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


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


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


def build_config(cls: type, values: dict[str, Any], what: str = "config") -> Any:
    """``cls(**values)`` with every value coerced to its field's type, rejecting unknown keys with the
    list of valid ones (shared by :class:`TrainConfig` and ``mamlkit.rl.config.RLConfig``)."""
    types_ = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown {what} key(s): {', '.join(unknown)}. Valid keys: {', '.join(types_)}")
    return cls(**{k: _coerce(k, v, types_[k]) for k, v in values.items()})


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a config from a dict, rejecting unknown keys with the list of valid ones."""
    return build_config(TrainConfig, values)


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


__all__ = ["TrainConfig", "ConfigError", "from_dict", "load_yaml", "flag", "GROUPS"]
