"""Meta-learning algorithms: one small file each, sharing the engine's pieces, no inheritance.

Every algorithm satisfies :class:`MetaLearner` and registers a builder under its ``--algo`` name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from mamlkit.base.batch import TaskBatch

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}
KIND_OF_LOSS = {"mse": "regression", "cross_entropy": "classification"}


def resolve_loss(loss_fn: str | Callable[[Tensor, Tensor], Tensor], kind: str | None
                 ) -> tuple[Callable[[Tensor, Tensor], Tensor], str]:
    """``(loss function, kind)`` from a loss name or callable; the kind defaults from a named loss,
    else to ``"regression"``."""
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise ValueError(f"unknown loss {loss_fn!r}; choose one of {', '.join(LOSSES)}")
        return LOSSES[loss_fn], kind or KIND_OF_LOSS[loss_fn]
    return loss_fn, kind or "regression"


@runtime_checkable
class MetaLearner(Protocol):
    """What the trainer, the evaluator and checkpoints need from an algorithm."""

    name: str
    model: nn.Module
    kind: str  # "regression" | "classification"

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """Everything the outer optimiser updates: the model's parameters and any learned extras."""

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean over tasks of the outer objective, with its graph; ``loss.backward()`` fills ``.grad``."""

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        """Accumulate ``weight ×`` the meta-gradient into ``.grad``, chunk by chunk, to save memory."""

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """Adapted parameters for one task (``support_x [N, ...]``)."""

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        """Query loss and accuracy ``[T, steps+1]`` after 0..steps inner steps (evaluation)."""


ALGORITHMS: dict[str, Callable[..., MetaLearner]] = {}


def register(name: str):
    """Register ``builder(model, cfg) -> MetaLearner`` under ``name``."""
    def deco(builder):
        ALGORITHMS[name] = builder
        return builder
    return deco


def build_learner(name: str, model: nn.Module, cfg: Any) -> MetaLearner:
    """Build the algorithm ``name`` for ``model`` from a :class:`~mamlkit.config.TrainConfig`."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
    patterns = getattr(cfg, "adapt", ())
    if patterns:
        from mamlkit.base.errors import UserError
        from mamlkit.engine.inner import check_patterns

        try:
            check_patterns([k for k, p in model.named_parameters() if p.requires_grad], patterns)
        except ValueError as err:
            raise UserError(str(err)) from None
    learner = ALGORITHMS[name](model, cfg)
    mode = getattr(cfg, "bn_mode", "transductive")
    if getattr(learner, "bn_mode", "transductive") != mode:
        from mamlkit.base.errors import UserError

        raise UserError(f"algorithm {name!r} does not support bn_mode={mode!r}; use --bn-mode transductive")
    return learner


from mamlkit.algorithms import anil, imaml, maml, mamlpp, metasgd, pretrain, reptile  # noqa: E402,F401  (registration)
