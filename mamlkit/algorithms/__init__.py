"""Meta-learning algorithms: one small file each, supplying only its pieces; no inheritance.

Each file builds a :class:`~mamlkit.algorithms.driver.Pieces` (which parameters adapt, the inner rule,
the outer objective, first order or not, extra meta-parameters, a step hook) and hands it to the one
driver, :class:`~mamlkit.algorithms.driver.Driver`, which satisfies :class:`MetaLearner`. It registers a
builder ``(model, cfg, executor)`` under its ``--algo`` name, and the options it reads
(:mod:`mamlkit.algorithms.options`). This module needs no torch until an algorithm is looked up, so that the
options and ``mamlkit train --help`` do not import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mamlkit.base.errors import UserError
from mamlkit.base.options import register_options, registered

if TYPE_CHECKING:
    from torch import Tensor, nn

    from mamlkit.base.batch import TaskBatch
    from mamlkit.exec.executor import Executor
    from mamlkit.exec.strategies import Work

KIND_OF_LOSS = {"mse": "regression", "cross_entropy": "classification"}
# The built-in algorithms' modules, imported (and so registered) on the first lookup of an algorithm.
BUILTIN = ("anil", "boil", "imaml", "maml", "mamlpp", "metasgd", "pretrain", "reptile")


def __getattr__(name: str):
    """``ALGORITHMS`` (every algorithm registered, the built-in ones imported first) and ``LOSSES``, on first use."""
    if name == "ALGORITHMS":
        for module in BUILTIN:
            importlib.import_module(f"{__name__}.{module}")
        globals()[name] = _BUILDERS
        return _BUILDERS
    if name == "LOSSES":
        import torch.nn.functional as F

        globals()[name] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_loss(loss_fn: str | Callable[[Tensor, Tensor], Tensor], kind: str | None
                 ) -> tuple[Callable[[Tensor, Tensor], Tensor], str]:
    """``(loss function, kind)`` from a loss name or callable; the kind defaults from a named loss,
    else to ``"regression"``."""
    if isinstance(loss_fn, str):
        losses = __getattr__("LOSSES")
        if loss_fn not in losses:
            raise ValueError(f"unknown loss {loss_fn!r}; choose one of {', '.join(losses)}")
        return losses[loss_fn], kind or KIND_OF_LOSS[loss_fn]
    return loss_fn, kind or "regression"


@runtime_checkable
class MetaLearner(Protocol):
    """What the trainer, the evaluator and checkpoints need from an algorithm. Every algorithm is a
    :class:`~mamlkit.algorithms.driver.Driver` built from its pieces, which provides all of it."""

    name: str  # logged and saved in checkpoints
    model: nn.Module
    kind: str  # "regression" | "classification"
    bn_mode: str  # "transductive" | "support": the statistics query predictions use (mamlkit.engine.norms)
    compilable: bool  # whether its per-task function runs under strategy "compile"
    executor: Executor  # how its tasks run: strategy, chunks, auto's trial (checkpoints record the strategy's name)
    output: Callable[[Any], Tensor]  # the tensor of the model's output the loss takes (mamlkit.engine.outputs)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """Everything the outer optimiser updates: the model's parameters and any learned extras."""

    def buffers(self) -> dict[str, Tensor]:
        """The model's buffers by name (saved in checkpoints, passed to ``functional.call``)."""

    def check_output(self, x: Tensor) -> None:
        """Refuse, once, an ``output`` selector that does not fit what the model returns on ``x`` (a task's inputs)."""

    def set_step(self, step: int) -> None:
        """The trainer's iteration, before each meta-iteration (step-dependent pieces, e.g. MAML++'s annealing)."""

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean over tasks of the outer objective, with its graph; ``loss.backward()`` fills ``.grad``."""

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        """Accumulate ``weight ×`` the meta-gradient into ``.grad``, chunk by chunk, to save memory."""

    def work(self) -> Work:
        """What its executor runs for a meta-gradient (per-task builder and meta-parameters): the trainer settles
        the strategy with it (:meth:`~mamlkit.exec.executor.Executor.settle`)."""

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None, *,
              guard: bool = False) -> dict[str, Tensor]:
        """Adapted parameters for one task (``support_x [N, ...]``); ``guard``: the inner rule within the descent
        safeguard (:func:`mamlkit.engine.rules.descent_guard`)."""

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        """Query loss and accuracy ``[T, steps+1]`` after 0..steps inner steps (evaluation)."""

    def guarded_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`adapted_losses` with the inner rule within the descent safeguard, and ``halved [T, steps+1]``:
        where a step was halved because the full step would have raised the support loss."""

    def describe(self, guard: bool = False) -> str:
        """The test-time inner rule in words (``guard``: within the descent safeguard), for reports and
        ``mamlkit adapt``: e.g. "SGD at α=0.01"."""


_BUILDERS: dict[str, Callable[..., MetaLearner]] = {}


def register(name: str, options: tuple[type, ...] | None = None) -> Callable:
    """Register ``builder(model, cfg, executor) -> MetaLearner`` under ``name``; ``options``: the options classes
    it reads (:mod:`mamlkit.base.options`; the built-in ones are registered in :mod:`mamlkit.algorithms.options`,
    so that their flags need no torch). A config that names ``name`` refuses every other plug-in option."""
    if options is not None or not registered("algo", name):  # an algorithm that reads no option has no flags
        register_options("algo", name, *(options or ()))

    def deco(builder: Callable[..., MetaLearner]) -> Callable[..., MetaLearner]:
        _BUILDERS[name] = builder
        return builder
    return deco


class UnknownAlgorithm(UserError, ValueError):
    """An algorithm name (a config's, or a checkpoint's config's) that no algorithm is registered under: the
    user's to fix (the CLI exits 2), and still the ``ValueError`` it always was."""


def build_learner(name: str, model: nn.Module, cfg: Any, executor: Executor | None = None) -> MetaLearner:
    """Build the algorithm ``name`` for ``model`` from a :class:`~mamlkit.config.TrainConfig`; its tasks run on
    ``executor`` (default: the one the config asks for, :meth:`~mamlkit.exec.executor.Executor.from_config`)."""
    from mamlkit.exec.executor import Executor

    algorithms = __getattr__("ALGORITHMS")
    if name not in algorithms:
        raise UnknownAlgorithm(f"unknown algorithm {str(name)[:100]!r} (--algo, or the algo a checkpoint's config "
                               f"names); available: {', '.join(sorted(algorithms))}")
    patterns = getattr(cfg, "adapt", ())
    if patterns:  # a pattern that matches no trainable parameter would adapt nothing: a typo, refused
        from mamlkit.base.errors import UserError
        from mamlkit.engine.inner import check_patterns

        try:
            check_patterns([k for k, p in model.named_parameters() if p.requires_grad], patterns)
        except ValueError as err:
            raise UserError(str(err)) from None
    return algorithms[name](model, cfg, executor or Executor.from_config(cfg, model))
