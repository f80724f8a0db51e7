"""BOIL, Body Only update in Inner Loop (Oh, Yoo, Kim & Yun, ICLR 2021, arXiv:2008.08882).

Pieces: the body adapts and the head is frozen in the inner loop (the paper's inner rate 0 for the
head), the opposite of ANIL; the inner rule is SGD at α; the outer objective is MAML's query loss,
second order unless ``first_order``; the head is still meta-learned in the outer loop. The head is the
last child of an ``nn.Sequential`` (conv4's ``head``, the MLP's last ``Linear``). So BOIL is MAML with
the head left out of adaptation, which a test checks in float64.
"""

from __future__ import annotations

from torch import nn

from mamlkit.algorithms import register
from mamlkit.algorithms.anil import split_head
from mamlkit.algorithms.driver import Driver, config_keywords
from mamlkit.algorithms.maml import MAML
from mamlkit.exec.executor import Executor


def BOIL(model: nn.Module, *, name: str = "boil", **kwargs) -> Driver:
    """BOIL over an ``nn.Sequential`` model. Arguments as :func:`~mamlkit.algorithms.maml.MAML`."""
    prefix = split_head(model)[0] + "."
    return MAML(model, adapt_filter=lambda k: not k.startswith(prefix), name=name, **kwargs)


@register("boil")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """BOIL (Oh et al. 2021): only the body adapts; the head is frozen in the inner loop."""
    return BOIL(model, **config_keywords(cfg, executor))
