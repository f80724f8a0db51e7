"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, arXiv:1810.09502, §4).

MAML with switchable fixes, each a piece of the engine:

* ``msl``: multi-step loss, Σ_k w_k L_q(θ_k) (:func:`~mamlkit.engine.inner.multi_step_objective`);
  the weights start uniform and anneal linearly over ``msl_epochs`` to the last step alone
  (non-final weights floored at 0.03/K while annealing), after which only L_q(θ_K) counts.
* ``lslr``: a learned rate per parameter tensor ("layer") and per step, meta-parameters
  ``inner_lr/<param>`` of shape ``[K]`` (:func:`~mamlkit.engine.rules.per_step_sgd`).
* ``per_step_bn``: each norm layer's weight and bias has one copy per step, meta-parameters
  ``bn/<param>`` ``[K+1, C]``; the forward pass at step k uses copy k, which the rule *sets* (the
  inner loop does not adapt them, as in the paper). Simplification: no per-step running
  *statistics*; mamlkit's norms use batch statistics during meta-learning, so there are none to
  keep, and models with ``track_running_stats=True`` use their single set.
* derivative-order annealing: first order while epoch < ``first_order_epochs``; the trainer
  reports the iteration through the learner's ``set_step`` (epoch = step // epoch_iterations).
* cosine annealing of the meta rate is the trainer's ``meta_lr_schedule="cosine"``.

With every part off this is MAML exactly (a test checks loss and gradient in float64).
At evaluation, steps beyond K reuse the last step's rate and batch-norm copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mamlkit.algorithms import register
from mamlkit.algorithms.driver import Driver, Pieces, config_keywords
from mamlkit.engine.functional import Params
from mamlkit.engine.inner import multi_step_objective, query_objective
from mamlkit.engine.rules import InnerRule, assign_per_step, chain, per_step_sgd, sgd
from mamlkit.exec.executor import Executor

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
LR, BN = "inner_lr/", "bn/"


def msl_weights(steps: int, epoch: int, msl_epochs: int, dtype=torch.float32) -> Tensor:
    """Per-step loss weights ``[K]``: uniform at epoch 0, annealed to the last step by ``msl_epochs``."""
    w = torch.zeros(steps, dtype=dtype)
    if epoch >= msl_epochs or steps == 1:
        w[-1] = 1.0
        return w
    floor, decay = 0.03 / steps, epoch / (steps * msl_epochs)
    w[:-1] = max(1.0 / steps - decay, floor)
    w[-1] = 1.0 - w[:-1].sum()
    return w


def _strip(extras: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in extras.items() if k.startswith(prefix)}


def MAMLPlusPlus(model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 5, first_order: bool = False,
                 loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse", kind: str | None = None,
                 test_inner_steps: int | None = None, msl: bool = True, msl_epochs: int = 10, lslr: bool = True,
                 per_step_bn: bool = True, first_order_epochs: int = 0, epoch_iterations: int = 500,
                 name: str = "mamlpp", bn_mode: str = "transductive", executor: Executor | None = None,
                 **execution) -> Driver:
    """MAML++ over any ``nn.Module``; see the module docstring. Other arguments as ``MAML``."""
    if inner_steps < 1:
        raise ValueError("MAML++ needs inner_steps >= 1")
    params = dict(model.named_parameters())
    norm_names = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, NORMS)
                  for p, _ in mod.named_parameters(recurse=False)}
    # Copy k of every norm parameter is used at step k (k = 0..K).
    bn = {k: nn.Parameter(torch.stack([params[k].detach()] * (inner_steps + 1)))
          for k in params if per_step_bn and k in norm_names}
    lrs = {k: nn.Parameter(torch.full((inner_steps,), inner_lr, dtype=p.dtype, device=p.device))
           for k, p in params.items() if lslr and k not in bn}
    p0 = next(model.parameters())

    def rule(extras: Params) -> InnerRule:
        """LSLR (or plain SGD) on the parameters, then the norm copies *set* to the next step's."""
        rates, copies = _strip(extras, LR), _strip(extras, BN)
        base = per_step_sgd(rates) if rates else sgd(inner_lr)
        return chain(base, assign_per_step(copies, inner_steps)) if copies else base

    def start(params: Params, extras: Params) -> Params:
        """θ0: the norm parameters are their step-0 copies."""
        return params | {k: v[0] for k, v in _strip(extras, BN).items()}

    def epoch(step: int) -> int:
        return step // epoch_iterations

    def objective(step: int):
        weights = msl_weights(inner_steps, epoch(step), msl_epochs, p0.dtype).to(p0.device)
        return multi_step_objective(weights) if msl else query_objective

    pieces = Pieces(name=name, inner_steps=inner_steps, test_inner_steps=test_inner_steps, rule=rule, start=start,
                    objective=objective, first_order=lambda step: first_order or epoch(step) < first_order_epochs,
                    extras={**{LR + k: v for k, v in lrs.items()}, **{BN + k: v for k, v in bn.items()}},
                    replaces=frozenset(bn), info={"bn": bn, "lrs": lrs})
    return Driver(model, pieces, loss_fn=loss_fn, kind=kind, bn_mode=bn_mode, executor=executor, **execution)


@register("mamlpp")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """MAML++ (Antoniou et al. 2019): MSL, LSLR, per-step BN, derivative-order and meta-rate annealing."""
    return MAMLPlusPlus(model, **config_keywords(cfg, executor), msl=cfg.msl, msl_epochs=cfg.msl_epochs, lslr=cfg.lslr,
                        per_step_bn=cfg.per_step_bn, first_order_epochs=cfg.first_order_epochs,
                        epoch_iterations=cfg.epoch_iterations)
