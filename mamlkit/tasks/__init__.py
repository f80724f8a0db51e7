"""Task distributions and the task-family registry.

A task family turns a :class:`~mamlkit.config.TrainConfig` into task distributions per split
(``"train" | "val" | "test"``) and names the model that fits them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mamlkit.base.batch import TaskBatch, TaskDistribution, task_generator
from mamlkit.tasks.sinusoid import USES as SINUSOID_USES
from mamlkit.tasks.sinusoid import Sinusoid


@dataclass(frozen=True)
class TaskFamily:
    name: str
    build: Callable[[Any, str], TaskDistribution]   # (cfg, split) -> distribution
    model_spec: Callable[[Any], dict[str, Any]]      # cfg -> spec for mamlkit.models.build_model
    # which of the family-dependent config fields (``config.TASK_FIELDS``) the family reads: a set, or a
    # function giving it (so that a lazily imported family's module is loaded only when asked)
    uses: frozenset[str] | Callable[[], frozenset[str]] = frozenset()

    def fields(self) -> frozenset[str]:
        return self.uses() if callable(self.uses) else self.uses


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
    uses=SINUSOID_USES,
))


def _lazy(module: str, attr: str, call: bool = True) -> Callable:
    """A family hook imported on first use, so `import mamlkit` does not load image code; ``call=False``:
    a hook that returns the module's attribute itself (``USES``)."""
    def hook(*args):
        import importlib

        value = getattr(importlib.import_module(f"mamlkit.tasks.{module}"), attr)
        return value(*args) if call else value
    return hook


def _lazy_family(name: str, module: str) -> TaskFamily:
    return TaskFamily(name=name, build=_lazy(module, "build"), model_spec=_lazy(module, "model_spec"),
                      uses=_lazy(module, "USES", call=False))


register_task_family(_lazy_family("omniglot", "omniglot"))
register_task_family(_lazy_family("miniimagenet", "miniimagenet"))
register_task_family(_lazy_family("csv", "tabular"))
register_task_family(_lazy_family("clinc", "text"))

__all__ = ["TaskBatch", "TaskDistribution", "TaskFamily", "task_generator", "Sinusoid", "TASK_FAMILIES",
           "register_task_family", "get_family"]
