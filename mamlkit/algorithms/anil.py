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

from mamlkit.algorithms import register, resolve_loss
from mamlkit.base.batch import TaskBatch
from mamlkit.engine.functional import call, named_buffers, named_params
from mamlkit.engine.inner import adapt_path, fresh, make_task_fn, path_objective, query_objective
from mamlkit.engine.norms import SupportStatsNorm
from mamlkit.engine.rules import sgd
from mamlkit.exec import strategies


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


class ANIL:
    """ANIL over an ``nn.Sequential`` model. Arguments as :class:`~mamlkit.algorithms.maml.MAML`."""

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse",
                 kind: str | None = None, test_inner_steps: int | None = None, strategy: str = "auto",
                 chunk_size: int | None = None, name: str = "anil", bn_mode: str = "transductive"):
        self.loss_fn, self.kind = resolve_loss(loss_fn, kind)
        self.model, self.name = model, name
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.head_name, self.body, self.head = split_head(model)
        self.bn_mode = bn_mode  # "support": query features use support-set BN statistics (mamlkit.engine.norms)
        self.prefix = self.head_name + "."
        device = next(model.parameters()).device
        self.strategy = strategies.choose_strategy(strategy, model, device, chunk_size)

    def adapt_filter(self, name: str) -> bool:
        return name.startswith(self.prefix)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def buffers(self) -> dict[str, Tensor]:
        return named_buffers(self.model)

    def _split(self, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        n = len(self.prefix)
        head = {k[n:]: v for k, v in params.items() if k.startswith(self.prefix)}
        return {k: v for k, v in params.items() if not k.startswith(self.prefix)}, head

    def _task_fn(self, params, steps: int, first_order: bool, objective=query_objective):
        body_params, head_params = self._split(params)
        body_buffers, head_buffers = self._split(self.buffers())
        # The head's own inner loop and objective, run on features instead of inputs.
        head_fn = make_task_fn(self.head, head_params, head_buffers, loss_fn=self.loss_fn,
                               rule=sgd(self.inner_lr), steps=steps, first_order=first_order,
                               objective=objective)

        def task_fn(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            # Once per task, with the graph to the body kept (exact second order through the body).
            fs = call(self.body, body_params, fresh(body_buffers), sx)
            if self.bn_mode == "support":
                with SupportStatsNorm(sx.shape[0]):
                    fq = call(self.body, body_params, fresh(body_buffers), torch.cat([sx, qx]))[sx.shape[0]:]
            else:
                fq = call(self.body, body_params, fresh(body_buffers), qx)
            return head_fn(fs, sy, fq, qy)

        return task_fn

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        fn = self._task_fn(named_params(self.model), self.inner_steps, self.first_order)
        losses, preds = strategies.map_tasks(fn, batch, self.strategy)
        return losses.mean(), strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        fn = self._task_fn(named_params(self.model), self.inner_steps, self.first_order)
        losses, preds = strategies.backward_tasks(fn, batch, self.strategy, weight,
                                              self.meta_parameters().values())
        return strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt the head to one task; returns every parameter (body shared, head adapted), detached."""
        steps = self.test_inner_steps if steps is None else steps
        params = {k: v.detach() for k, v in named_params(self.model).items()}
        body_params, head_params = self._split(params)
        body_buffers, head_buffers = self._split(self.buffers())
        feats = call(self.body, body_params, fresh(body_buffers), support_x).detach()

        def loss(fast, x, y):
            return self.loss_fn(call(self.head, fast, fresh(head_buffers), x), y)

        path = adapt_path(loss, head_params, feats, support_y, rule=sgd(self.inner_lr), steps=steps,
                          first_order=True)
        return {**body_params, **{self.prefix + k: v.detach() for k, v in path[-1].items()}}

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        params = {k: v.detach() for k, v in named_params(self.model).items()}
        fn = self._task_fn(params, steps, first_order=True, objective=path_objective(self.kind))
        losses, accs = strategies.map_tasks(fn, batch, self.strategy)
        return losses.detach(), accs.detach()


@register("anil", uses=frozenset({"first_order"}))
def build(model: nn.Module, cfg) -> ANIL:
    """ANIL (Raghu et al. 2020): only the head adapts; body features computed once per task."""
    return ANIL(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=cfg.first_order,
                loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps, strategy=cfg.strategy,
                chunk_size=cfg.chunk_size or None, bn_mode=cfg.bn_mode)
