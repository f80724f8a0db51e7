"""The options of the built-in algorithms: each settings group is one frozen dataclass with its own checks,
registered under the names of the algorithms that read it. A group several algorithms read (``--adapt``,
``--first-order``, ``--checkpoint-inner``) is one class, so each flag has one owner.

Kept apart from the algorithms' code, which imports torch, so that the flags of ``mamlkit train --help`` are
generated without it. An algorithm of one file declares its own class there and registers it with
``algorithms.register(name, options=(...))`` (docs/DEVELOPING.md, "How to add an algorithm").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mamlkit.base.options import EXECUTION, INNER, OUTER, need, option, register_options
from mamlkit.base.patterns import compile_patterns


@dataclass(frozen=True, kw_only=True)
class AdaptOptions:
    """Which parameters adapt, for the algorithms whose adapted set is the user's to choose (ANIL adapts its
    head and Reptile everything, by design)."""

    adapt: tuple[str, ...] = option((), INNER, "adapt only parameters whose name matches this glob or regex "
                                    "(repeatable)")

    def __post_init__(self) -> None:
        compile_patterns(self.adapt)  # bounded, and matched without backtracking (mamlkit.base.patterns)
        for pattern in self.adapt:
            need(bool(pattern.strip()), "adapt patterns must not be empty")


@dataclass(frozen=True, kw_only=True)
class FirstOrderOptions:
    """Second-order or first-order meta-gradients, for the algorithms that offer both."""

    first_order: bool = option(False, INNER, "drop second-order terms of the meta-gradient (FOMAML)")


@dataclass(frozen=True, kw_only=True)
class CheckpointInnerOptions:
    """Recomputing the inner loop in the backward: for the algorithms whose per-task function is the unrolled
    inner loop (:func:`mamlkit.algorithms.driver.unrolled`), where it gives the same meta-gradient bit for bit
    (tests/test_options.py)."""

    checkpoint_inner: bool = option(False, EXECUTION, "recompute inner steps in the backward: memory flat in "
                                    "inner_steps, more time")

    def check(self, cfg: Any) -> None:
        """The recomputation runs task by task: only in the strategies that run tasks one at a time."""
        need(not self.checkpoint_inner or cfg.strategy in ("auto", "loop", "threads"),
             f"checkpoint_inner works with --strategy auto, loop or threads, got --algo {cfg.algo} "
             f"--strategy {cfg.strategy}")


@dataclass(frozen=True, kw_only=True)
class MamlppOptions:
    """MAML++ (Antoniou et al. 2019); each part can be switched off."""

    msl: bool = option(True, OUTER, "multi-step loss with annealed per-step weights")
    msl_epochs: int = option(10, OUTER, "epochs over which the MSL weights anneal to the last step")
    lslr: bool = option(True, INNER, "learned per-layer, per-step inner rates")
    per_step_bn: bool = option(True, INNER, "per-step batch-norm weights and biases")
    first_order_epochs: int = option(0, OUTER, "first-order meta-gradient for these first epochs")
    epoch_iterations: int = option(500, OUTER, "iterations per epoch of its schedules (paper: 500)")

    def __post_init__(self) -> None:
        for name, low in (("msl_epochs", 0), ("first_order_epochs", 0), ("epoch_iterations", 1)):
            need(getattr(self, name) >= low, f"{name} must be >= {low}, got {getattr(self, name)}")

    def check(self, cfg: Any) -> None:
        """The multi-step loss and the per-step rates need a step to weigh and to rate."""
        need(cfg.inner_steps >= 1, "mamlpp needs inner_steps >= 1")


@dataclass(frozen=True, kw_only=True)
class ReptileOptions:
    """Reptile (Nichol et al. 2018): its own inner optimiser."""

    reptile_inner_optimizer: str = option("sgd", INNER, "inner optimiser sgd | adam (paper: Adam, beta1 = 0)")
    reptile_inner_lr: float = option(0.02, INNER, "inner step size")
    reptile_inner_steps: int = option(5, INNER, "inner steps per task")

    def __post_init__(self) -> None:
        need(self.reptile_inner_optimizer in ("sgd", "adam"),
             f"reptile_inner_optimizer must be sgd or adam, got {self.reptile_inner_optimizer!r}")
        need(self.reptile_inner_lr >= 0, f"reptile_inner_lr must be >= 0, got {self.reptile_inner_lr}")
        need(self.reptile_inner_steps >= 0, f"reptile_inner_steps must be >= 0, got {self.reptile_inner_steps}")


@dataclass(frozen=True, kw_only=True)
class ImamlOptions:
    """iMAML (Rajeswaran et al. 2019); its inner SGD uses inner_lr and inner_steps."""

    imaml_lambda: float = option(1.0, INNER, "λ, strength of the proximal term")
    cg_steps: int = option(5, OUTER, "conjugate-gradient iterations for the implicit meta-gradient")

    def __post_init__(self) -> None:
        need(self.imaml_lambda > 0, f"imaml_lambda must be > 0, got {self.imaml_lambda}")
        need(self.cg_steps >= 1, f"cg_steps must be >= 1, got {self.cg_steps}")


# The options each built-in algorithm reads.
for _name, _classes in {
    "maml": (FirstOrderOptions, AdaptOptions, CheckpointInnerOptions),
    "fomaml": (AdaptOptions, CheckpointInnerOptions),
    "metasgd": (FirstOrderOptions, AdaptOptions, CheckpointInnerOptions),
    "pretrain": (AdaptOptions,),  # it trains without inner steps: nothing to recompute
    "anil": (FirstOrderOptions,),  # its per-task function adapts the head on fixed features: nothing to recompute
    "boil": (FirstOrderOptions, CheckpointInnerOptions),
    "mamlpp": (FirstOrderOptions, CheckpointInnerOptions, MamlppOptions),
    "reptile": (ReptileOptions,),
    "imaml": (ImamlOptions,),
}.items():
    register_options("algo", _name, *_classes)

__all__ = ["AdaptOptions", "FirstOrderOptions", "CheckpointInnerOptions", "MamlppOptions", "ReptileOptions",
           "ImamlOptions"]
