"""Non-meta-learned baselines, evaluated on the same fixed test tasks as the meta-learner.

* :func:`prototype_accuracy`: nearest class centroid (prototypes, Snell et al. 2017) in the input
  space, e.g. the frozen sentence embeddings; squared Euclidean distance.
* :func:`scratch_losses`: a model trained from a fresh random initialisation on each task's
  support set alone (full-batch Adam, :func:`mamlkit.engine.rules.adam`), then scored on the query set.
  For text this is "a fresh head on the support set"; for CSV tasks "a per-task model from scratch".

Both are vectorised over tasks with ``torch.vmap``; randomness comes from an explicit seed only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from mamlkit.algorithms import LOSSES
from mamlkit.engine.rules import adam, apply_updates


def prototype_accuracy(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, n_way: int) -> Tensor:
    """Per-task query accuracy ``[T]`` of the nearest support centroid.

    ``sx [T, N·K, D]``, ``sy [T, N·K]`` (ids ``0..n_way-1``), ``qx [T, Q, D]``, ``qy [T, Q]``.
    """
    onehot = nn.functional.one_hot(sy, n_way).to(sx.dtype)                # [T, NK, N]
    protos = onehot.transpose(1, 2) @ sx / onehot.sum(1)[..., None]         # [T, N, D]
    dist = torch.cdist(qx, protos)                                          # [T, Q, N]
    return (dist.argmin(-1) == qy).to(sx.dtype).mean(-1)


def scratch_losses(model: nn.Module, loss: str, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *,
                   steps: int = 100, lr: float = 1e-2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Train a fresh copy of ``model`` per task on its support set, full batch, with Adam.

    Every task starts from the same random initialisation (drawn from ``seed`` in a forked RNG, so
    the global RNG is untouched); ``model``'s own weights are not used. Returns the query loss and
    accuracy ``[T]`` (accuracy 0 for regression). ``sx [T, N_s, ...]``, ``qx [T, N_q, ...]``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    loss_fn = LOSSES[loss]

    def task_loss(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x,)), y)

    rule = adam(lr, betas=(0.9, 0.999), eps=1e-8)

    def train(x, y):
        p = dict(params0)
        state = rule.init(p)
        for step in range(steps):
            g, _ = grad_and_value(task_loss)(p, x, y)
            updates, state = rule.update(g, state, p, step=step)
            p = apply_updates(p, updates)
        return p

    def task(x, y, xq, yq):
        p = train(x, y)
        pred = functional_call(model, (p, buffers), (xq,))
        acc = (pred.argmax(-1) == yq).to(pred.dtype).mean() if loss == "cross_entropy" \
            else torch.zeros((), dtype=pred.dtype)
        return loss_fn(pred, yq), acc

    losses, accs = vmap(task)(sx, sy, qx, qy)
    return losses.detach(), accs.detach()


__all__ = ["prototype_accuracy", "scratch_losses"]
