"""mamlkit: exact, fast, model-agnostic meta-learning on torch.func.

>>> import mamlkit
>>> learner = mamlkit.MAML(model, inner_lr=0.01, inner_steps=1, loss_fn="mse")
>>> loss, metrics = learner.meta_loss(batch)   # batch: mamlkit.tasks.TaskBatch
>>> loss.backward()
"""

from __future__ import annotations

import importlib
import importlib.util
import typing

__version__ = "0.1.0"

# The modules that register the built-in plug-ins' options (mamlkit.base.options loads them on its first
# lookup, since configs must not import plug-ins): the task families, the algorithms, the RL algorithms and the
# RL environment families. Light modules: `mamlkit train --help` and `mamlkit rl train --help` need no torch.
PLUGINS = ("mamlkit.tasks", "mamlkit.algorithms.options", "mamlkit.rl.options", "mamlkit.rl.families")

# The public names and the modules that define them. They are imported on first use, so that the
# command line (`mamlkit --help`, `mamlkit presets`) answers without importing torch.
_PUBLIC = {"MAML": "mamlkit.algorithms.maml", "load": "mamlkit.use.api", "MetaLearner": "mamlkit.algorithms",
           "ALGORITHMS": "mamlkit.algorithms", "build_learner": "mamlkit.algorithms", "TaskBatch": "mamlkit.tasks",
           "TrainConfig": "mamlkit.config", "ConfigError": "mamlkit.config", "UserError": "mamlkit.base.errors",
           "PRESETS": "mamlkit.presets", "preset_config": "mamlkit.presets"}

if typing.TYPE_CHECKING:
    from mamlkit.algorithms import ALGORITHMS, MetaLearner, build_learner
    from mamlkit.algorithms.maml import MAML
    from mamlkit.base.errors import UserError
    from mamlkit.config import ConfigError, TrainConfig
    from mamlkit.engine import functional
    from mamlkit.presets import PRESETS, preset_config
    from mamlkit.tasks import TaskBatch
    from mamlkit.use.api import load


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name == "functional":
        value = importlib.import_module("mamlkit.engine.functional")
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a part, read as an attribute: mamlkit.models.mlp
    else:
        raise AttributeError(f"module 'mamlkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["MAML", "load", "MetaLearner", "ALGORITHMS", "build_learner", "TaskBatch", "TrainConfig", "ConfigError",
           "UserError", "PRESETS", "preset_config", "functional", "__version__"]
