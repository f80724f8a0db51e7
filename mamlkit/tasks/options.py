"""The options of the task families: each settings group is one frozen dataclass with its own checks, and
each family lists the groups it reads on its registry line (:mod:`mamlkit.tasks`). A group several families
share (the Conv4 image fields, ``n_way``, the data folder) is one class here, so each flag has one owner.

Kept apart from the families' code, which imports torch, so that the flags of ``mamlkit train --help`` are
generated without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mamlkit.base.choices import BN_MODES, bad_choice
from mamlkit.base.options import LOGGING, MODEL, TASK, need, option


def _at_least(opts: Any, low: int, *names: str) -> None:
    for name in names:
        need(getattr(opts, name) >= low, f"{name} must be >= {low}, got {getattr(opts, name)}")


def _one_of(opts: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(opts, name)
    need(value in choices, f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MLPOptions:
    """The widths of a family's MLP (sinusoid, CSV tasks, the CLINC head)."""

    hidden_sizes: tuple[int, ...] = option((40, 40), MODEL, "MLP hidden layer widths")

    def __post_init__(self) -> None:
        need(all(h >= 1 for h in self.hidden_sizes), f"hidden_sizes must be positive, got {self.hidden_sizes}")


@dataclass(frozen=True, kw_only=True)
class ClassifierOptions:
    """No flag of its own: a family that lists it classifies, so its loss is cross-entropy (the learner's kind
    follows its loss), whichever preset the run starts from."""

    def derived(self) -> dict[str, Any]:
        return {"loss": "cross_entropy"}


@dataclass(frozen=True, kw_only=True)
class RegressionEvalOptions:
    """The final evaluation of a regression family: query loss per number of shots."""

    eval_shots: tuple[int, ...] = option((5, 10, 20), LOGGING, "support sizes K evaluated")
    eval_query: int = option(100, LOGGING, "query points per evaluation task (0: K, as many as support)")

    def __post_init__(self) -> None:
        need(all(s >= 1 for s in self.eval_shots) and len(self.eval_shots) > 0,
             f"eval_shots must be positive, got {self.eval_shots}")
        _at_least(self, 0, "eval_query")


@dataclass(frozen=True, kw_only=True)
class ConvOptions:
    """The Conv4 network of the image families."""

    filters: int = option(64, MODEL, "Conv4 channels per layer (paper: 64 Omniglot, 32 mini-ImageNet)")
    pool: bool = option(False, MODEL, "Conv4 with stride-1 convs and 2x2 max-pool (mini-ImageNet) instead of "
                        "stride-2 convs")
    image_size: int = option(28, MODEL, "image side after preprocessing (Omniglot 28, mini-ImageNet 84)")
    bn_mode: str = option("transductive", MODEL, "batch norm statistics: transductive (query batch, the paper's) | "
                          "support (support set only)")

    def __post_init__(self) -> None:
        msg = bad_choice("bn_mode", self.bn_mode, BN_MODES)
        need(msg is None, msg or "")
        need(self.filters >= 1 and self.image_size >= 8,
             f"filters must be >= 1 and image_size >= 8, got {self.filters} and {self.image_size}")


@dataclass(frozen=True, kw_only=True)
class EpisodeOptions:
    """N-way episodes of a classification family."""

    n_way: int = option(5, TASK, "classes per task (classification)")

    def __post_init__(self) -> None:
        _at_least(self, 1, "n_way")


@dataclass(frozen=True, kw_only=True)
class DataRootOptions:
    """Where a family with a downloadable data set finds it."""

    data_root: str = option("", TASK, "data folder (empty: $MAMLKIT_DATA, else ~/.cache/mamlkit)")


@dataclass(frozen=True, kw_only=True)
class ChecksumOptions:
    """Whether a family accepts data files of an unknown version."""

    trust_checksum: bool = option(False, TASK, "use data files whose checksum matches no known version")


@dataclass(frozen=True, kw_only=True)
class OmniglotOptions:
    """Omniglot's character split and rotation classes."""

    split: str = option("paper", TASK, "characters: paper (1100/100/423) | background (official)")
    rotations: str = option("per_task", TASK, "rotation classes: per_task | expand | none")

    def __post_init__(self) -> None:
        need(self.split in ("paper", "background"), f"split must be paper or background, got {self.split!r}"
             + (" (the official background/evaluation split is called 'background')"
                if self.split == "vinyals" else ""))
        need(self.rotations in ("per_task", "expand", "none"),
             f"rotations must be per_task, expand or none, got {self.rotations!r}")


@dataclass(frozen=True, kw_only=True)
class PathOptions:
    """The file or folder a family reads its tasks from."""

    path: str = option("", TASK, "the CSV file (csv) or the folder of class folders "
                        "(images)")


@dataclass(frozen=True, kw_only=True)
class TaskSplitOptions:
    """How a family made from one file or folder divides it between the splits."""

    task_split: tuple[float, ...] = option((0.7, 0.15, 0.15), TASK, "fractions of tasks (images: of classes) for train "
                                           "val test")

    def __post_init__(self) -> None:
        need(len(self.task_split) == 3 and all(f >= 0 for f in self.task_split)
             and abs(sum(self.task_split) - 1) < 1e-6,
             f"task_split must be three fractions (train val test) summing to 1, got {self.task_split}")


@dataclass(frozen=True, kw_only=True)
class CsvOptions:
    """Tasks from a CSV file: a task per distinct value of ``task_column``."""

    task_column: str = option("", TASK, "column whose values name the tasks (patient, asset, site)")
    target: str = option("", TASK, "column to predict")
    features: tuple[str, ...] = option((), TASK, "feature columns (none given: every other column)")
    kind: str = option("regression", TASK, "regression (mse) | classification (cross_entropy); sets the loss")
    fill: str = option("none", TASK, "missing values: none (error naming rows) | drop | mean (meta-train mean)")
    max_categories: int = option(20, TASK, "one-hot cap for a categorical column (more: an error naming it)")
    small_tasks: str = option("skip", TASK, "tasks with < k_shot + k_query rows: skip (counted) | error")

    def __post_init__(self) -> None:
        _one_of(self, "kind", ("regression", "classification"))
        _one_of(self, "fill", ("none", "drop", "mean"))
        _at_least(self, 1, "max_categories")
        _one_of(self, "small_tasks", ("skip", "error"))

    def derived(self) -> dict[str, Any]:
        """The kind of a CSV task picks its loss, so ``--kind classification`` suffices."""
        return {"loss": "mse" if self.kind == "regression" else "cross_entropy"}


@dataclass(frozen=True, kw_only=True)
class ImagesOptions:
    """Any folder of labelled images."""

    channels: int = option(3, TASK, "1 (grey) | 3 (RGB) input channels")
    small_classes: str = option("skip", TASK, "classes with < k_shot + k_query images: skip (counted) | "
                                "error")

    def __post_init__(self) -> None:
        need(self.channels in (1, 3), f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        _one_of(self, "small_classes", ("skip", "error"))


@dataclass(frozen=True, kw_only=True)
class TextOptions:
    """Few-shot text (CLINC150) on a sentence encoder."""

    encoder_mode: str = option("frozen", MODEL, "frozen (cached sentence embeddings, adapted head) | "
                               "finetune (the last encoder layers adapt too)")
    finetune_layers: int = option(1, MODEL, "with --encoder-mode finetune: how many of the last encoder layers "
                                  "adapt")
    finetune_rate_scale: float = option(1.0, MODEL, "with --encoder-mode finetune: layers held as W/c, so inner "
                                        "rate α·c² and meta rate ~c·β")
    text_max_tokens: int = option(24, MODEL, "with --encoder-mode finetune: tokens kept per utterance (CLINC: 99% "
                                  "have <= 21)")
    text_per_intent: int = option(100, TASK, "the first N of each intent's 100 train utterances")

    def __post_init__(self) -> None:
        _one_of(self, "encoder_mode", ("frozen", "finetune"))
        need(1 <= self.finetune_layers <= 6,
             f"finetune_layers must be in 1..6 (MiniLM-L6 has 6 layers), got {self.finetune_layers}")
        need(self.finetune_rate_scale > 0, f"finetune_rate_scale must be > 0, got {self.finetune_rate_scale}")
        need(self.text_max_tokens >= 4, f"text_max_tokens must be >= 4, got {self.text_max_tokens}")
        need(1 <= self.text_per_intent <= 100, f"text_per_intent must be in 1..100, got {self.text_per_intent}")


_IMAGE = (ConvOptions, EpisodeOptions)
# The options each built-in family reads (its registry line in mamlkit.tasks passes them).
FAMILY_OPTIONS: dict[str, tuple[type, ...]] = {
    "sinusoid": (MLPOptions, RegressionEvalOptions),
    "omniglot": (*_IMAGE, DataRootOptions, ChecksumOptions, OmniglotOptions),
    "miniimagenet": (*_IMAGE, DataRootOptions),
    "csv": (MLPOptions, PathOptions, CsvOptions, TaskSplitOptions),
    "clinc": (MLPOptions, EpisodeOptions, DataRootOptions, ChecksumOptions, TextOptions),
    "images": (*_IMAGE, PathOptions, TaskSplitOptions, ImagesOptions),
}

__all__ = ["MLPOptions", "RegressionEvalOptions", "ConvOptions", "EpisodeOptions", "DataRootOptions",
           "ChecksumOptions", "OmniglotOptions", "PathOptions", "TaskSplitOptions", "CsvOptions", "ImagesOptions",
           "TextOptions", "FAMILY_OPTIONS"]
