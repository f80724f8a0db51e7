"""Run configuration: one frozen, keyword-only dataclass, checked on construction.

Every field is a CLI flag (``inner_lr`` → ``--inner-lr``) and a YAML key. Presets
(:mod:`mamlkit.presets`) fill it with a paper's setting; a YAML file and flags override.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from mamlkit.base.errors import UserError


class ConfigError(UserError, ValueError):
    """A user's configuration mistake; the CLI prints it and exits with code 2."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a run. Defaults are the paper's sinusoid setting (Finn et al. 2017)."""

    # what to learn
    task: str = "sinusoid"            # task family: sinusoid, omniglot, ...
    algo: str = "maml"                # algorithm, see `mamlkit algos`
    loss: str = "mse"                 # mse | cross_entropy
    model: str = ""                   # '': the task's own | package.module:factory | Hugging Face folder or hf:ID
    model_args: str = ""              # JSON object: keyword arguments of --model's factory or Hugging Face wrapper
    adapt: tuple[str, ...] = ()       # adapt only parameters whose name matches a glob or regex (repeatable)
    hidden_sizes: tuple[int, ...] = (40, 40)  # MLP hidden widths
    filters: int = 64                 # Conv4 channels per layer (paper: 64 Omniglot, 32 mini-ImageNet)
    pool: bool = False                # Conv4: stride-1 convs + 2x2 max-pool (mini-ImageNet) vs stride-2 convs
    image_size: int = 28              # image side after preprocessing (Omniglot 28, mini-ImageNet 84)
    bn_mode: str = "transductive"     # transductive: query batch stats (paper) | support: support set's only
    # episodes
    n_way: int = 5                    # classes per task (classification)
    k_shot: int = 10                  # support examples per class (per task for regression)
    k_query: int = 10                 # query examples per class (per task for regression)
    # inner loop
    inner_lr: float = 0.01            # α
    inner_steps: int = 1              # K during meta-training
    test_inner_steps: int | None = None  # K at evaluation/adapt (None: inner_steps)
    first_order: bool = False         # FOMAML
    # outer loop
    meta_batch: int = 25              # tasks per meta-iteration
    meta_lr: float = 1e-3             # β (Adam)
    iterations: int = 70_000
    # execution
    strategy: str = "auto"            # auto (measured on the first batch) | vmap | loop | threads | compile
    chunk_size: int = 0               # tasks per backward chunk (0: whole batch for vmap)
    memory_budget: float = 0.0        # MB of tensors a meta-iteration may hold; chunks vmap to fit (0: no limit)
    checkpoint_inner: bool = False    # recompute inner steps in the meta-gradient: memory flat in inner_steps
    device: str = "cpu"
    dtype: str = "float32"            # float32 | float64
    threads: int = 0                  # torch threads (0: torch's default)
    tune_malloc: bool = True          # glibc keeps freed memory for reuse: fewer page faults, ~+10% RSS
    fast_kernels: bool = True         # compiled CPU forward kernels for NCHW max-pool and batch norm (kernels.py)
    backend: str = "auto"             # torchrun backend: auto (nccl on CUDA, else gloo) | gloo | nccl
    dist_timeout: int = 600           # seconds a collective waits for the other ranks before the job fails
    seed: int = 0
    # data
    data_root: str = ""               # dataset folder ('' : --data-root, $MAMLKIT_DATA, or the cache)
    trust_checksum: bool = False      # use data files whose checksum matches no known version
    split: str = "paper"              # Omniglot characters: paper (1100/100/423) | background (official)
    rotations: str = "per_task"       # Omniglot rotation classes: per_task | expand | none
    # tasks from a CSV (task csv, issue 9): a task per distinct value of task_column
    path: str = ""                    # the CSV file
    task_column: str = ""             # column whose values name the tasks (patient, asset, site)
    target: str = ""                  # column to predict
    features: tuple[str, ...] = ()    # feature columns (empty: every other column)
    kind: str = "regression"          # csv: regression (mse) | classification (cross_entropy); sets the loss
    fill: str = "none"                # missing values: none (error naming rows) | drop | mean (meta-train mean)
    max_categories: int = 20          # one-hot cap for a categorical column (more: an error naming it)
    task_split: tuple[float, ...] = (0.7, 0.15, 0.15)  # fractions of tasks for train / val / test
    small_tasks: str = "skip"         # tasks with < k_shot + k_query rows: skip (counted) | error
    # few-shot text (task clinc, issue 9)
    encoder_mode: str = "frozen"      # frozen: cached sentence embeddings + adapted head | finetune: last layers too
    finetune_layers: int = 1          # encoder_mode finetune: how many of the last encoder layers adapt
    finetune_rate_scale: float = 1.0  # encoder_mode finetune: layers held as W/c: inner rate α·c², meta rate ~c·β
    text_max_tokens: int = 24         # encoder_mode finetune: tokens kept per utterance (CLINC: 99% have <= 21)
    text_per_intent: int = 100        # CLINC utterances per intent: the first N of its 100 train utterances
    # logging, validation, checkpoints
    out_dir: str = "runs"
    run_name: str = ""                # '' : <preset or task>-<algo>
    log_every: int = 100
    val_every: int = 2_000
    val_tasks: int = 100
    checkpoint_every: int = 5_000
    progress: bool = True
    tensorboard: bool = True
    # final evaluation
    eval_tasks: int = 600
    eval_steps: tuple[int, ...] = (0, 1, 5, 10)
    eval_shots: tuple[int, ...] = (5, 10, 20)   # regression: K values evaluated
    eval_query: int = 100             # regression: query points per evaluation task
    compare_pretrained: bool = True   # also train the pretrained baseline and compare
    preset: str = ""                  # the preset this config started from (informational)
    # MAML family (issue 5). Outer meta-rate schedule, applied by the trainer every iteration:
    meta_optimizer: str = "adam"      # adam | sgd (Reptile's outer step θ ← θ + ε(φ̄ − θ) is SGD at ε)
    meta_lr_schedule: str = "constant"  # constant | cosine (MAML++) | linear (Reptile), to min_meta_lr
    min_meta_lr: float = 0.0          # the schedule's final meta rate
    # MAML++ (--algo mamlpp, Antoniou et al. 2019); each part can be switched off
    msl: bool = True                  # multi-step loss with annealed per-step weights
    msl_epochs: int = 10              # epochs over which the MSL weights anneal to the last step
    lslr: bool = True                 # learned per-layer, per-step inner rates
    per_step_bn: bool = True          # per-step batch-norm weights and biases
    first_order_epochs: int = 0       # derivative-order annealing: first order for these epochs
    epoch_iterations: int = 500       # iterations per "epoch" of the MAML++ schedules (paper: 500)
    # Reptile (--algo reptile, Nichol et al. 2018): its own inner optimiser
    reptile_inner_optimizer: str = "sgd"  # sgd | adam (paper: Adam with beta1 = 0)
    reptile_inner_lr: float = 0.02
    reptile_inner_steps: int = 5
    # iMAML (--algo imaml, Rajeswaran et al. 2019); inner SGD uses inner_lr and inner_steps
    imaml_lambda: float = 1.0         # λ, strength of the proximal term
    cg_steps: int = 5                 # conjugate-gradient iterations for the implicit gradient

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(_json_object(self.model_args) is not None,
             f"model_args must be a JSON object such as '{{\"hidden\": 64}}', got {self.model_args!r}")
        for pattern in self.adapt:
            need(bool(pattern.strip()), "adapt patterns must not be empty")
        need(not self.adapt or self.algo in ADAPT_ALGOS,
             f"--adapt works with --algo {', '.join(ADAPT_ALGOS)}, not {self.algo} (ANIL adapts its head by design)")
        need(self.loss in ("mse", "cross_entropy"), f"loss must be 'mse' or 'cross_entropy', got {self.loss!r}")
        need(self.strategy in ("auto", "vmap", "loop", "threads", "compile"),
             f"strategy must be auto, vmap, loop, threads or compile, got {self.strategy!r}")
        need(self.memory_budget >= 0, f"memory_budget must be >= 0 MB (0: no limit), got {self.memory_budget}")
        need(not self.checkpoint_inner
             or (self.algo in ("maml", "fomaml") and self.strategy in ("auto", "loop", "threads")),
             "checkpoint_inner works with --algo maml or fomaml and --strategy auto, loop or threads, got "
             f"--algo {self.algo} --strategy {self.strategy}")
        need(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        need(self.bn_mode in ("transductive", "support"),
             f"bn_mode must be transductive or support, got {self.bn_mode!r}")
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
                     "checkpoint_every", "eval_tasks", "eval_query"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_steps", "chunk_size", "threads", "val_tasks"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.test_inner_steps is None or self.test_inner_steps >= 0, "test_inner_steps must be >= 0")
        need(self.inner_lr >= 0, f"inner_lr must be >= 0, got {self.inner_lr}")
        need(self.meta_lr > 0, f"meta_lr must be > 0, got {self.meta_lr}")
        need(self.meta_optimizer in ("adam", "sgd"),
             f"meta_optimizer must be adam or sgd, got {self.meta_optimizer!r}")
        need(self.meta_lr_schedule in ("constant", "cosine", "linear"),
             f"meta_lr_schedule must be constant, cosine or linear, got {self.meta_lr_schedule!r}")
        need(0 <= self.min_meta_lr <= self.meta_lr,
             f"min_meta_lr must be in [0, meta_lr], got {self.min_meta_lr}")
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
        need(self.encoder_mode in ("frozen", "finetune"),
             f"encoder_mode must be frozen or finetune, got {self.encoder_mode!r}")
        need(1 <= self.finetune_layers <= 6,
             f"finetune_layers must be in 1..6 (MiniLM-L6 has 6 layers), got {self.finetune_layers}")
        need(self.finetune_rate_scale > 0, f"finetune_rate_scale must be > 0, got {self.finetune_rate_scale}")
        need(self.text_max_tokens >= 4, f"text_max_tokens must be >= 4, got {self.text_max_tokens}")
        need(1 <= self.text_per_intent <= 100, f"text_per_intent must be in 1..100, got {self.text_per_intent}")
        if self.task == "csv":  # the kind of a CSV task picks its loss, so `--kind classification` suffices
            object.__setattr__(self, "loss", "mse" if self.kind == "regression" else "cross_entropy")

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


# The algorithms whose adapted set ``--adapt`` chooses (the others fix it: ANIL its head, Reptile all).
ADAPT_ALGOS = ("maml", "fomaml", "metasgd", "pretrain")


def _json_object(text: str) -> dict[str, Any] | None:
    """``text`` as a JSON object (``{}`` for ''), or None when it is not one."""
    import json

    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
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
    """Read a YAML mapping of config overrides."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


__all__ = ["TrainConfig", "ConfigError", "from_dict", "load_yaml"]
