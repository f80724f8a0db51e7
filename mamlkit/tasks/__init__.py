"""Task distributions and the task-family registry.

A task family (:class:`~mamlkit.tasks.family.TaskFamily`) turns a :class:`~mamlkit.config.TrainConfig`
into task distributions per split (``"train" | "val" | "test"``), names the model that fits them, says
how raw inputs become model inputs, what ``mamlkit data`` does for it and what its evaluation report
contains. One registry line per family below; the hooks of image and text families load on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mamlkit.base.options import register_options
from mamlkit.tasks.family import INPUT_TYPES, Baseline, Column, DataCommand, Report, TaskFamily
from mamlkit.tasks.options import (
    FAMILY_OPTIONS,
    ChecksumOptions,
    ClassifierOptions,
    ConvOptions,
    DataRootOptions,
    EpisodeOptions,
    MLPOptions,
    PathOptions,
    RegressionEvalOptions,
    TaskSplitOptions,
)

if TYPE_CHECKING:
    from mamlkit.base.batch import TaskBatch, TaskDistribution, task_generator
    from mamlkit.tasks.sinusoid import Sinusoid

# Imported on first use: the registry itself needs no torch, so that the options it registers (the flags of
# the command line's --help) do not import it.
_LAZY = {"TaskBatch": "mamlkit.base.batch", "TaskDistribution": "mamlkit.base.batch",
         "task_generator": "mamlkit.base.batch", "Sinusoid": "mamlkit.tasks.sinusoid"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

TASK_FAMILIES: dict[str, TaskFamily] = {}


def register_task_family(family: TaskFamily) -> TaskFamily:
    """Register ``family`` under its ``--task`` name, with the options classes it reads (``family.options``):
    a config for it refuses every other plug-in option."""
    register_options("task", family.name, *family.options)
    TASK_FAMILIES[family.name] = family
    return family


def get_family(name: str) -> TaskFamily:
    from mamlkit.base.errors import UserError

    if name not in TASK_FAMILIES:
        raise UserError(f"unknown task family {name!r}; available: {', '.join(sorted(TASK_FAMILIES))}")
    return TASK_FAMILIES[name]


def data_commands() -> dict[str, DataCommand]:
    """``mamlkit data NAME`` for every family that declares a dataset: name -> command."""
    return {f.data.name: f.data for f in TASK_FAMILIES.values() if f.data is not None}


def _lazy(module: str, attr: str) -> Callable:
    """A family hook imported on first use, so `import mamlkit` does not load image code."""
    def hook(*args):
        import importlib

        return getattr(importlib.import_module(f"mamlkit.tasks.{module}"), attr)(*args)
    return hook


def _family(name: str, module: str, *, data: str = "", options: tuple[type, ...] | None = None,
            **hooks: bool) -> TaskFamily:
    """The registry line of a family whose hooks live in ``mamlkit.tasks.<module>`` under their own names;
    ``options``: the options classes it reads (default: a built-in family's, ``FAMILY_OPTIONS``)."""
    return TaskFamily(name=name, build=_lazy(module, "build"), model_spec=_lazy(module, "model_spec"),
                      data=DataCommand(data, _lazy(module, "prepare_data")) if data else None,
                      options=FAMILY_OPTIONS[name] if options is None else options,
                      **{hook: _lazy(module, hook) for hook, on in hooks.items() if on})


register_task_family(TaskFamily(
    name="sinusoid",
    build=lambda cfg, split: __getattr__("Sinusoid")(k_support=cfg.k_shot, k_query=cfg.k_query),
    model_spec=lambda cfg: {"name": "mlp", "in_features": 1,
                            "hidden": list(cfg.hidden_sizes), "out_features": 1},
    input_spec=lambda cfg: {"type": "vector", "features": 1},  # x, one column
    report=lambda cfg: Report(table="shots", title="Sinusoid regression", figures=("sinusoid",)),
    options=FAMILY_OPTIONS["sinusoid"],
))
register_task_family(_family("omniglot", "omniglot", data="omniglot", input_spec=True, report=True))
register_task_family(_family("miniimagenet", "miniimagenet", data="miniimagenet", input_spec=True))
register_task_family(_family("csv", "tabular", input_spec=True, report=True))
register_task_family(_family("clinc", "text", data="clinc150", input_spec=True, report=True))
register_task_family(_family("images", "images", input_spec=True, report=True))

__all__ = ["TaskBatch", "TaskDistribution", "TaskFamily", "task_generator", "Sinusoid", "TASK_FAMILIES",
           "register_task_family", "get_family", "data_commands", "INPUT_TYPES", "Baseline",
           "Column", "DataCommand", "Report", "MLPOptions", "RegressionEvalOptions", "ConvOptions", "EpisodeOptions",
           "DataRootOptions", "ChecksumOptions", "ClassifierOptions", "PathOptions", "TaskSplitOptions"]
