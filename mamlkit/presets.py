"""Presets: named after the paper setting they reproduce, with the citation.

Each preset is a set of overrides of :class:`~mamlkit.config.TrainConfig` defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mamlkit.config import ConfigError, TrainConfig, from_dict


@dataclass(frozen=True)
class Preset:
    name: str
    overrides: dict[str, Any]
    citation: str
    summary: str
    paper: dict[str, Any]  # the paper's printed numbers, shown beside ours in reports


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


register_preset(Preset(
    name="sinusoid",
    overrides=dict(task="sinusoid", algo="maml", loss="mse", model="mlp", hidden_sizes=(40, 40), k_shot=10,
                   k_query=10, inner_lr=0.01, inner_steps=1, test_inner_steps=10, meta_batch=25, meta_lr=1e-3,
                   iterations=70_000, eval_steps=(0, 1, 5, 10), eval_shots=(5, 10, 20)),
    citation="Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017, §5.1 and Fig. 2-3",
    summary="sinusoid regression, MLP 1-40-40-1, K=10, α=0.01, 1 step, meta-batch 25, Adam 1e-3, 70k its",
    # Read off the paper's Figure 3 (5-shot, after 1/5/10 gradient steps).
    paper={"maml": {5: {1: 0.67, 5: 0.38, 10: 0.35}}, "pretrain": {5: {1: 2.41, 5: 2.23, 10: 2.19}}},
))


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The preset's config with ``overrides`` applied (unknown keys are an error)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    values = {**TrainConfig().to_dict(), **PRESETS[name].overrides, "preset": name}
    return from_dict({**values, **(overrides or {})})
