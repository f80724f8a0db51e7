"""Task distributions and the task-family registry.

A task family turns a :class:`~mamlkit.config.TrainConfig` into task distributions per split
(``"train" | "val" | "test"``) and names the model that fits them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mamlkit.base.batch import TaskBatch, TaskDistribution, task_generator
from mamlkit.tasks.sinusoid import Sinusoid


@dataclass(frozen=True)
class TaskFamily:
    name: str
    build: Callable[[Any, str], TaskDistribution]   # (cfg, split) -> distribution
    model_spec: Callable[[Any], dict[str, Any]]      # cfg -> spec for mamlkit.models.build_model


TASK_FAMILIES: dict[str, TaskFamily] = {}


def register_task_family(family: TaskFamily) -> TaskFamily:
    TASK_FAMILIES[family.name] = family
    return family


def get_family(name: str) -> TaskFamily:
    from mamlkit.base.errors import UserError

    if name not in TASK_FAMILIES:
        raise UserError(f"unknown task family {name!r}; available: {', '.join(sorted(TASK_FAMILIES))}")
    return TASK_FAMILIES[name]


register_task_family(TaskFamily(
    name="sinusoid",
    build=lambda cfg, split: Sinusoid(k_support=cfg.k_shot, k_query=cfg.k_query),
    model_spec=lambda cfg: {"name": "mlp", "in_features": 1,
                            "hidden": list(cfg.hidden_sizes), "out_features": 1},
))


def _lazy(module: str, attr: str) -> Callable:
    """A family hook imported on first use, so `import mamlkit` does not load image code."""
    def hook(*args):
        import importlib

        return getattr(importlib.import_module(f"mamlkit.tasks.{module}"), attr)(*args)
    return hook


register_task_family(TaskFamily(name="omniglot", build=_lazy("omniglot", "build"),
                                model_spec=_lazy("omniglot", "model_spec")))
register_task_family(TaskFamily(name="miniimagenet", build=_lazy("miniimagenet", "build"),
                                model_spec=_lazy("miniimagenet", "model_spec")))
register_task_family(TaskFamily(name="csv", build=_lazy("tabular", "build"),
                                model_spec=_lazy("tabular", "model_spec")))
register_task_family(TaskFamily(name="clinc", build=_lazy("text", "build"),
                                model_spec=_lazy("text", "model_spec")))

__all__ = ["TaskBatch", "TaskDistribution", "TaskFamily", "task_generator", "Sinusoid", "TASK_FAMILIES",
           "register_task_family", "get_family"]
