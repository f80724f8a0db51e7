"""mamlkit: exact, fast, model-agnostic meta-learning on torch.func.

>>> import mamlkit
>>> learner = mamlkit.MAML(model, inner_lr=0.01, inner_steps=1, loss_fn="mse")
>>> loss, metrics = learner.meta_loss(batch)   # batch: mamlkit.tasks.TaskBatch
>>> loss.backward()
"""

from mamlkit import functional
from mamlkit.algorithms import ALGORITHMS, MetaLearner, build_learner
from mamlkit.algorithms.maml import MAML
from mamlkit.api import load
from mamlkit.config import ConfigError, TrainConfig
from mamlkit.errors import UserError
from mamlkit.presets import PRESETS, preset_config
from mamlkit.tasks import TaskBatch

__version__ = "0.1.0"

__all__ = ["MAML", "load", "MetaLearner", "ALGORITHMS", "build_learner", "TaskBatch", "TrainConfig", "ConfigError",
           "UserError", "PRESETS", "preset_config", "functional", "__version__"]
