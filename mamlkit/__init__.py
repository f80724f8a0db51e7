"""mamlkit: exact, fast, model-agnostic meta-learning on torch.func.

>>> import mamlkit
>>> learner = mamlkit.MAML(model, inner_lr=0.01, inner_steps=1, loss_fn="mse")
>>> loss, metrics = learner.meta_loss(batch)   # batch: mamlkit.tasks.TaskBatch
>>> loss.backward()
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import typing

__version__ = "0.1.0"

# The modules that register the built-in plug-ins' options (mamlkit.base.options loads them on its first
# lookup, since configs must not import plug-ins). Light modules: `mamlkit train --help` needs no torch.
PLUGINS = ("mamlkit.tasks", "mamlkit.algorithms.options")

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
    elif name in _MOVED or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a part, read as an attribute: mamlkit.models.mlp
    else:
        raise AttributeError(f"module 'mamlkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["MAML", "load", "MetaLearner", "ALGORITHMS", "build_learner", "TaskBatch", "TrainConfig", "ConfigError",
           "UserError", "PRESETS", "preset_config", "functional", "__version__"]

# Modules that lived at the top of the package before it was arranged in parts (engine/, exec/, eval/, ...).
# ``import mamlkit.functional`` and ``from mamlkit.inner import adapt_path`` keep working: the old name is the
# same module object as the new one (so state such as the kernels' switch is shared), imported on first use.
_MOVED = {
    "functional": "engine.functional", "inner": "engine.inner", "rules": "engine.rules", "norms": "engine.norms",
    "tuning": "exec.tuning", "memory": "exec.memory", "kernels": "exec.kernels", "fusion": "exec.kernels.fusion",
    "evaluate": "eval.evaluate", "reports": "eval.reports", "api": "use.api", "encoders": "data.encoders",
    "train": "loop.train", "schedules": "loop.schedules", "distributed": "loop.distributed",
    "errors": "base.errors", "metrics": "base.metrics",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(__name__ + ".")
        if fullname.startswith(__name__ + ".") and old in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        self.specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system set the old name's spec on the module; give it back its own
        module.__spec__ = self.specs.pop(module.__spec__.name)


sys.meta_path.append(_MovedModules())
