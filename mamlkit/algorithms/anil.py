"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, arXiv:1909.09157).

Pieces: only the head adapts (the last child of an ``nn.Sequential``: ``head`` in conv4, the last
``Linear`` of the MLP); the inner rule is SGD at α; the outer objective is MAML's query loss.

Speed: the body's features are computed once per task, for the support and for the query set,
and the inner loop runs the head alone on them. Nothing is lost: the body is not adapted, so
its features are the same at every inner step. The meta-gradient stays exact at second order,
because the features keep their autograd graph to the body's parameters: the inner gradients
depend on the support features, and the outer gradient flows through both feature sets into the
body. A test checks ANIL against MAML with the body excluded from adaptation (float64).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mamlkit.algorithms import register
from mamlkit.algorithms.driver import Driver, Pieces, config_keywords
from mamlkit.engine.functional import Params, call
from mamlkit.engine.inner import fresh, make_task_fn, support_loss_fn
from mamlkit.engine.norms import SupportStatsNorm
from mamlkit.engine.rules import InnerRule
from mamlkit.exec.executor import Executor


def split_head(model: nn.Module) -> tuple[str, nn.Module, nn.Module]:
    """``(head_name, body, head)`` of an ``nn.Sequential``: the head is its last child, the body a
    Sequential of the others that shares their parameters and keeps their names."""
    children = list(model.named_children())
    if not isinstance(model, nn.Sequential) or len(children) < 2:
        raise ValueError("ANIL needs an nn.Sequential whose last child is the head (conv4's `head`, "
                         f"the MLP's last Linear); got {type(model).__name__}")
    name, head = children[-1]
    if not any(True for _ in head.parameters()):
        raise ValueError(f"ANIL: the last child {name!r} of the model has no parameters to adapt")
    return name, nn.Sequential(OrderedDict(children[:-1])), head


def _split(prefix: str, tensors: Params) -> tuple[Params, Params]:
    """``(body, head)``: the head's entries lose their ``prefix``."""
    n = len(prefix)
    head = {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in tensors.items() if not k.startswith(prefix)}, head


def _head_task(learner: Driver, theta: Params, rule: InnerRule, *, steps: int, first_order: bool, objective):
    """The head's inner loop and objective, run on the body's features, computed once per task."""
    body, head, prefix = learner.body, learner.head, learner.head_name + "."
    body_params, head_params = _split(prefix, theta)
    body_buffers, head_buffers = _split(prefix, learner.buffers())
    # the head's output is the model's (the last child of the Sequential), so the selector applies to it
    head_fn = make_task_fn(head, head_params, head_buffers, loss_fn=learner.loss_fn, rule=rule, steps=steps,
                           first_order=first_order, objective=objective, output=learner.output)

    def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        # Once per task, with the graph to the body kept (exact second order through the body).
        fs = call(body, body_params, fresh(body_buffers), sx)
        if learner.bn_mode == "support":
            with SupportStatsNorm(sx.shape[0]):
                fq = call(body, body_params, fresh(body_buffers), torch.cat([sx, qx]))[sx.shape[0]:]
        else:
            fq = call(body, body_params, fresh(body_buffers), qx)
        return head_fn(fs, sy, fq, qy)

    return task_fn


def _head_view(learner: Driver, theta: Params, x: Tensor):
    """Where ``adapt``'s inner loop runs (:attr:`~mamlkit.algorithms.driver.Pieces.inner_view`): the head,
    on the body's features of ``x`` computed once; ``finish`` puts the body's parameters back beside it."""
    prefix = learner.head_name + "."
    body_params, head_params = _split(prefix, theta)
    body_buffers, head_buffers = _split(prefix, learner.buffers())
    feats = call(learner.body, body_params, fresh(body_buffers), x).detach()
    loss = support_loss_fn(learner.head, learner.loss_fn, {}, head_buffers, learner.output)
    return loss, head_params, feats, lambda head: {**body_params, **{prefix + k: v for k, v in head.items()}}


def ANIL(model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
         loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse", kind: str | None = None,
         test_inner_steps: int | None = None, name: str = "anil", bn_mode: str = "transductive",
         executor: Executor | None = None, **execution) -> Driver:
    """ANIL over an ``nn.Sequential`` model. Arguments as :func:`~mamlkit.algorithms.maml.MAML`."""
    head_name, body, head = split_head(model)
    prefix = head_name + "."
    pieces = Pieces(name=name, inner_steps=inner_steps, test_inner_steps=test_inner_steps, inner_lr=inner_lr,
                    adapts=lambda k: k.startswith(prefix), first_order=lambda step: first_order,
                    task=_head_task, inner_view=_head_view, info={"head_name": head_name, "body": body, "head": head})
    return Driver(model, pieces, loss_fn=loss_fn, kind=kind, bn_mode=bn_mode, executor=executor, **execution)


@register("anil")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """ANIL (Raghu et al. 2020): only the head adapts; body features computed once per task."""
    return ANIL(model, **config_keywords(cfg, executor))
