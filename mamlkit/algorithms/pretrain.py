"""The paper's "pretrained" baseline (Finn et al. 2017, §5.1): one network trained on all tasks
jointly, then fine-tuned at test time with the same inner SGD as MAML.

Pieces: no inner steps in training; the outer objective is the loss on the support and
query points at θ itself. Adaptation at test time is MAML's, so the comparison is fair.
"""

from __future__ import annotations

import torch
from torch import nn

from mamlkit.algorithms import register
from mamlkit.algorithms.driver import Driver
from mamlkit.algorithms.maml import MAML
from mamlkit.engine.inner import name_filter
from mamlkit.exec.executor import Executor


def joint_objective(path, loss, sx, sy, qx, qy, predict, loss_fn):
    """Plain supervised loss at θ0 on every point of the task."""
    x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
    pred = predict(path[0], x)
    return loss_fn(pred, y), pred[sx.shape[0]:]


@register("pretrain")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """The pretrained baseline (Finn et al. 2017): joint training on all tasks, MAML's fine-tuning at test."""
    return MAML(model, inner_lr=cfg.inner_lr, inner_steps=0, loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps,
                objective=joint_objective, name="pretrain", bn_mode=cfg.bn_mode, executor=executor,
                adapt_filter=name_filter(cfg.adapt), output=cfg.output_spec)  # fine-tunes what MAML adapts
