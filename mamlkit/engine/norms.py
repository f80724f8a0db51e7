"""Batch-norm modes for few-shot classification: transductive (the paper) or support-only statistics.

MAML's networks use BatchNorm with the statistics of the current batch, also at test time
(``track_running_stats=False``; Finn et al. 2017's code does the same). When the query set is
passed as one batch, every query prediction then depends on the *other* query images: the
evaluation is transductive (Nichol et al. 2018, §3 discuss the effect). This is the default
(``bn_mode="transductive"``), so that numbers compare with the paper, and every report says so.

``bn_mode="support"`` removes the dependence. Query images are normalised with the statistics of
the support set under the same adapted parameters θ_K: the query pass runs the model on
``cat([support_x, x])`` under :class:`SupportStatsNorm`, which computes every batch-norm layer's
mean and variance from the first ``n_support`` rows only and normalises all rows with them, then
keeps the rows after the support. Why one concatenated pass and not "record the statistics of
the support pass and reuse them": the last support pass of the inner loop runs at θ_{K-1} (it
computes the gradient that makes θ_K), so its statistics are not those of θ_K; and statistics
recorded inside ``torch.func.grad`` belong to another transform level. The concatenated pass
has no state, gives each layer exactly the statistics a support-only pass at θ_K would, lets the
meta-gradient flow through those statistics at any order, and works unchanged per task in a loop
and under ``torch.vmap`` (the mean and variance are composite ops, exact at second order, like
:class:`~mamlkit.engine.functional.ExactNorms`). Row ``i`` of the output depends only on the support
set and query image ``i`` (convolutions, activations and the head act per image).

To predict the same way by hand after ``params = learner.adapt(sx, sy)``::

    with SupportStatsNorm(len(sx)):
        logits = mamlkit.engine.functional.call(model, params, buffers, torch.cat([sx, qx]))[len(sx):]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mamlkit.base.choices import BN_MODES


def _support_batch_norm(n: int, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                        weight: Tensor | None, bias: Tensor | None, training: bool, eps: float) -> Tensor:
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        dims = [0] + list(range(2, input.dim()))
        ref = input[:n]
        mean = ref.mean(dims, keepdim=True)
        var = (ref - mean).pow(2).mean(dims, keepdim=True)  # biased, as batch norm normalises
    else:  # running statistics (a model in eval mode with tracked stats) are already per-image
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


class SupportStatsNorm(TorchFunctionMode):
    """Batch norm with statistics from the first ``n_support`` rows of each batch (see module docstring).

    Running statistics are read, never written (as in :class:`~mamlkit.engine.functional.ExactNorms`).
    """

    def __init__(self, n_support: int):
        super().__init__()
        if n_support < 1:
            raise ValueError(f"n_support must be >= 1, got {n_support}")
        self.n = n_support

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # The two entry points order their arguments differently.
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        elif func is torch.batch_norm:
            names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
        else:
            return func(*args, **kwargs)
        a = {**dict(zip(names, args)), **kwargs}
        return _support_batch_norm(self.n, a["input"], a.get("running_mean"), a.get("running_var"),
                                   a.get("weight"), a.get("bias"), a.get("training", False),
                                   a.get("eps", 1e-5))


def support_stats_objective(objective):
    """Wrap an outer objective (``mamlkit.engine.inner`` signature) so that its predictions on anything but the
    support set use support-set batch-norm statistics: ``predict(fast, x)`` becomes
    ``model(cat([sx, x]))[len(sx):]`` under :class:`SupportStatsNorm`."""

    def wrapped(path, loss, sx, sy, qx, qy, predict, loss_fn):
        n = sx.shape[0]

        def predict_support_stats(fast, x):
            with SupportStatsNorm(n):
                return predict(fast, torch.cat([sx, x]))[n:]

        return objective(path, loss, sx, sy, qx, qy, predict_support_stats, loss_fn)

    return wrapped


def with_bn_mode(objective, bn_mode: str):
    """``objective`` as ``bn_mode`` asks: unchanged for ``"transductive"`` (batch statistics, the paper),
    wrapped by :func:`support_stats_objective` for ``"support"``."""
    return support_stats_objective(objective) if bn_mode == "support" else objective


__all__ = ["BN_MODES", "SupportStatsNorm", "support_stats_objective"]
