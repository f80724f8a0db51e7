"""A meta-learner from its parts: the config, the model spec and, optionally, stored tensors.

The one builder under both the trainer (:func:`mamlkit.loop.train.build`) and inference loading
(:func:`mamlkit.use.api.load`), so a checkpoint is rebuilt for adaptation exactly as it was for training,
without the trainer. The caller supplies the model spec: the task family's ``model_spec(cfg)`` when
training, the checkpoint's stored spec when loading (a CSV task's comes from a file that need not exist
where the checkpoint is adapted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mamlkit import checkpoint, config
from mamlkit.algorithms import MetaLearner, build_learner
from mamlkit.base.errors import UserError
from mamlkit.exec.executor import Executor
from mamlkit.models import build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def assemble(cfg: config.TrainConfig, spec: dict[str, Any], state: dict[str, torch.Tensor] | None = None
             ) -> MetaLearner:
    """The model of ``spec`` and the learner of ``cfg``, its tasks run by the executor ``cfg`` asks for (built
    here and handed in); meta-parameters and buffers from ``state`` if given.

    The initial weights come from ``cfg.seed`` in a forked RNG, so the global RNG is untouched.
    """
    problem = checkpoint.device_problem(cfg.device)
    if problem is not None:  # before building: torch would fail on first use in its own words
        raise UserError(f"--device {cfg.device[:100]}: {problem}; choose a device this machine has (--device cpu)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(spec)
    model = model.to(device=cfg.device, dtype=DTYPES[cfg.dtype])
    learner = build_learner(cfg.algo, model, cfg, Executor.from_config(cfg, model))
    if state is not None:
        restore(learner, state)
    return learner


def config_of(state: dict[str, Any], path: str | Path) -> config.TrainConfig:
    """The run config a checkpoint's ``state`` describes (:func:`mamlkit.config.from_stored`: files written
    before the plug-ins owned their options load too); a missing or malformed one is a CheckpointError."""
    if not isinstance(state.get("config"), dict):
        raise checkpoint.CheckpointError(f"{path} holds no run config (state['config']); it cannot be loaded as a "
                                         "run")
    try:
        cfg = config.from_stored(state["config"])
    except UserError as e:
        raise checkpoint.CheckpointError(f"{path}: its run config is invalid: {e}") from None
    problem = checkpoint.device_problem(cfg.device)
    if problem is not None:
        raise checkpoint.CheckpointError(f"{path}: its run config asks for device {cfg.device[:100]!r}, but "
                                         f"{problem}. Load it on a machine that has that device")
    return cfg


def restore(learner: MetaLearner, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's ``meta/*`` parameters and ``buffer/*`` buffers into ``learner``, after checking
    every tensor's name, shape and dtype against the model (a tensor that would merely broadcast is refused)."""
    params = learner.meta_parameters()
    checkpoint.check_tensors(tensors, "meta/", params)
    checkpoint.check_tensors(tensors, "buffer/", dict(learner.model.named_buffers()), required=False)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"meta/{k}"])
        for k, b in learner.model.named_buffers():
            if f"buffer/{k}" in tensors:
                b.copy_(tensors[f"buffer/{k}"])


__all__ = ["DTYPES", "assemble", "config_of", "restore"]
