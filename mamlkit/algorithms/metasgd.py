"""Meta-SGD (Li, Zhou, Chen & Li, 2017, arXiv:1707.09835): MAML with a learned inner rate per
parameter entry, α ∈ R^{|θ|}, meta-learned together with θ.

Pieces: every parameter adapts (or those passing ``adapt_filter``); the inner rule is
:func:`~mamlkit.engine.rules.per_parameter_sgd` over the rate tensors, which are meta-parameters named
``inner_lr/<param>``; the outer objective is MAML's query loss, second order unless
``first_order``. The paper draws α's initial values at random; here every rate starts at
``inner_lr`` (deterministic, and exactly MAML at initialisation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mamlkit.algorithms import register
from mamlkit.algorithms.driver import Driver, Pieces, config_keywords
from mamlkit.engine.functional import named_params
from mamlkit.engine.inner import name_filter
from mamlkit.engine.rules import per_parameter_sgd
from mamlkit.exec.executor import Executor

PREFIX = "inner_lr/"


def MetaSGD(model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
            loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse", kind: str | None = None,
            adapt_filter: Callable[[str], bool] | None = None, test_inner_steps: int | None = None,
            name: str = "metasgd", bn_mode: str = "transductive", executor: Executor | None = None,
            **execution) -> Driver:
    """Meta-SGD over any ``nn.Module``; see the module docstring. Arguments as :func:`MAML`."""
    # One rate tensor per adapted parameter, same shape (the paper's vector α).
    rates = {PREFIX + k: nn.Parameter(torch.full_like(p.detach(), inner_lr))
             for k, p in named_params(model, adapt_filter).items()}
    pieces = Pieces(name=name, inner_steps=inner_steps, test_inner_steps=test_inner_steps, adapts=adapt_filter,
                    rule=lambda extras: per_parameter_sgd({k[len(PREFIX):]: v for k, v in extras.items()}),
                    first_order=lambda step: first_order, extras=rates,
                    info={"inner_lrs": {k[len(PREFIX):]: v for k, v in rates.items()}})
    return Driver(model, pieces, loss_fn=loss_fn, kind=kind, bn_mode=bn_mode, executor=executor, **execution)


@register("metasgd")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """Meta-SGD (Li et al. 2017): learned per-parameter inner rates, initialised at --inner-lr."""
    return MetaSGD(model, **config_keywords(cfg, executor), adapt_filter=name_filter(cfg.adapt))
