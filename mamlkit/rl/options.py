"""The help groups of ``mamlkit rl train`` and the options of its RL algorithms (:mod:`mamlkit.base.options`,
kind ``rl-algo``): TRPO's settings, read by ``maml-trpo`` and ``pretrain`` (TRPO on all tasks jointly).

A light module (no torch), listed in :data:`mamlkit.PLUGINS`, so that ``mamlkit rl train --help`` lists these
flags without importing the trainer. The environment families' options live beside their registry lines in
:mod:`mamlkit.rl.families`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mamlkit.base.options import need, option, register_options

# The groups of `mamlkit rl train --help`, in order. Each field carries its group and its one line of help.
ENVIRONMENT, POLICY, INNER, OUTER, ESTIMATOR, EXECUTION, LOGGING = GROUPS = (
    "environment and sampling", "policy", "inner loop", "outer loop (TRPO)", "returns and gradient estimator",
    "execution", "logging, checkpoints and evaluation")


def rl_option(default: Any, group: str, help: str) -> Any:
    """A field of the RL config or of an RL plug-in's options, under one of :data:`GROUPS`."""
    return option(default, group, help, GROUPS)


@dataclass(frozen=True, kw_only=True)
class TRPOOptions:
    """The outer step of both RL algorithms: TRPO's trust region, conjugate gradient, line search and Fisher."""

    max_kl: float = rl_option(0.01, OUTER, "δ, the trust region's bound on the mean KL")
    cg_iters: int = rl_option(10, OUTER, "conjugate-gradient iterations solving F x = g")
    cg_damping: float = rl_option(1e-5, OUTER, "λ added to the Fisher: (F + λI) v")
    ls_steps: int = rl_option(15, OUTER, "backtracking line-search steps")
    ls_ratio: float = rl_option(0.8, OUTER, "step shrink factor per backtrack, in (0, 1)")
    fisher_tasks: int = rl_option(0, OUTER, "tasks whose KL gives the Fisher (0: all; fewer: faster, approximate)")
    fisher_fraction: float = rl_option(0.2, OUTER, "fraction of post-update states in the Fisher's KL (1: all; 0.2: "
                                       "16% faster a meta-iteration on nav2d, the same returns on two seeds)")
    fast_fisher: bool = rl_option(True, OUTER, "gradient and Fisher products task by task (same numbers, faster); "
                                  "off: through the whole batch's graph")

    def __post_init__(self) -> None:
        for name in ("cg_iters", "ls_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.fisher_tasks >= 0, f"fisher_tasks must be >= 0, got {self.fisher_tasks}")
        need(self.max_kl > 0 and self.cg_damping >= 0, "max_kl must be > 0 and cg_damping >= 0")
        need(0 < self.fisher_fraction <= 1, f"fisher_fraction must be in (0, 1], got {self.fisher_fraction}")
        need(0 < self.ls_ratio < 1, f"ls_ratio must be in (0, 1), got {self.ls_ratio}")


# maml-trpo: MAML's inner step, TRPO outside; pretrain: TRPO on all tasks jointly (the paper's baseline)
for _name in ("maml-trpo", "pretrain"):
    register_options("rl-algo", _name, TRPOOptions)

__all__ = ["GROUPS", "ENVIRONMENT", "POLICY", "INNER", "OUTER", "ESTIMATOR", "EXECUTION", "LOGGING", "rl_option",
           "TRPOOptions"]
