"""MAML (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400) and first-order MAML.

Pieces: every parameter adapts (or those passing ``adapt_filter``), the inner rule is SGD at
rate α, the outer objective is the query loss after K steps, second order unless
``first_order=True``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mamlkit.algorithms import register, resolve_loss
from mamlkit.base.batch import TaskBatch
from mamlkit.engine.functional import named_buffers, named_params
from mamlkit.engine.inner import (
    Objective,
    adapt_path,
    make_task_fn,
    name_filter,
    path_objective,
    query_objective,
    split_params,
    support_loss_fn,
    trainable_filter,
)
from mamlkit.engine.norms import BN_MODES, with_bn_mode
from mamlkit.engine.rules import sgd
from mamlkit.exec import strategies


class MAML:
    """Model-agnostic meta-learning over any ``nn.Module``.

    Args:
        model: any module; it is called as ``model(x)`` through ``functional_call``.
        inner_lr: α, the inner SGD rate (paper: 0.01 sinusoid, 0.4 Omniglot 5-way).
        inner_steps: K inner steps during meta-training.
        first_order: FOMAML: drop the Hessian terms of the meta-gradient.
        loss_fn: ``loss(pred, target) -> scalar``, or ``"mse"`` / ``"cross_entropy"``.
        kind: ``"regression"`` or ``"classification"``; inferred from a named ``loss_fn``.
        adapt_filter: which parameters adapt, by name (default: all). ANIL adapts ``head.*``.
        test_inner_steps: K at evaluation and in :meth:`adapt` (default: ``inner_steps``).
        strategy: ``"auto" | "vmap" | "loop" | "threads" | "compile"``, how tasks are batched
            (see :mod:`mamlkit.exec.strategies`).
        chunk_size: tasks per chunk in :meth:`meta_backward`; bounds memory.
        checkpoint_inner: recompute each inner step's graph during the meta-gradient instead of keeping
            it, so second-order memory does not grow with ``inner_steps`` (loop strategy; same numbers).
        objective: the outer objective (default: query loss at θ_K; see :mod:`mamlkit.engine.inner`).
        bn_mode: ``"transductive"`` (batch statistics of the query batch, the paper) or ``"support"``
            (query predictions use support-set batch-norm statistics; see :mod:`mamlkit.engine.norms`).
        name: the name logged and saved in checkpoints.

    Example::

        learner = MAML(model, inner_lr=0.01, inner_steps=1, loss_fn="mse")
        loss, metrics = learner.meta_loss(batch)   # batch: TaskBatch with T tasks
        loss.backward()                            # .grad on model.parameters()
    """

    compilable = True  # meta_backward runs through strategies.meta_backward: strategy "compile" works

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse",
                 kind: str | None = None, adapt_filter: Callable[[str], bool] | None = None,
                 test_inner_steps: int | None = None, strategy: str = "auto", chunk_size: int | None = None,
                 objective: Objective = query_objective, name: str = "maml", bn_mode: str = "transductive",
                 checkpoint_inner: bool = False):
        if inner_steps < 0 or (test_inner_steps is not None and test_inner_steps < 0):
            raise ValueError("inner_steps and test_inner_steps must be >= 0")
        loss_fn, kind = resolve_loss(loss_fn, kind)
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {', '.join(BN_MODES)}")
        self.model, self.objective, self.name, self.bn_mode = model, objective, name, bn_mode
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.loss_fn, self.kind, self.adapt_filter = loss_fn, kind, adapt_filter
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.checkpoint_inner = checkpoint_inner
        device = next(model.parameters()).device
        self.strategy = strategies.choose_strategy(strategy, model, device, chunk_size,
                                                   checkpoint_inner=checkpoint_inner)
        # one builder object for the training function, so a compiled meta-gradient is built once
        self._train_build = lambda params: self._task_fn(params, self.inner_steps, self.first_order)
        strategies.log.info("mamlkit: %s runs tasks with strategy %s", self.name, self.strategy.name)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def buffers(self) -> dict[str, Tensor]:
        return named_buffers(self.model)

    def _task_fn(self, params, steps: int, first_order: bool, objective: Objective | None = None):
        return make_task_fn(self.model, params, self.buffers(), loss_fn=self.loss_fn, rule=sgd(self.inner_lr),
                            steps=steps, first_order=first_order, adapt_filter=self.adapt_filter,
                            objective=with_bn_mode(objective or self.objective, self.bn_mode),
                            checkpoint=self.checkpoint_inner)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        fn = self._task_fn(named_params(self.model), self.inner_steps, self.first_order)
        losses, preds = strategies.map_tasks(fn, batch, self.strategy)
        return losses.mean(), strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        losses, preds = strategies.meta_backward(self._train_build, self.meta_parameters(), batch, self.strategy,
                                             weight)
        return strategies.task_metrics(losses, preds, batch.query_y, self.kind)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt to one task; returns every parameter (adapted or shared), detached.

        ``support_x [N, *x_shape]``, ``support_y [N, *y_shape]``. Run the model with the result via
        ``mamlkit.engine.functional.call(learner.model, params, learner.buffers(), x)``.
        """
        steps = self.test_inner_steps if steps is None else steps
        params = {k: v.detach() for k, v in named_params(self.model).items()}
        fast, shared = split_params(params, trainable_filter(self.model, self.adapt_filter))
        loss = support_loss_fn(self.model, self.loss_fn, shared, self.buffers())
        path = adapt_path(loss, fast, support_x, support_y, rule=sgd(self.inner_lr), steps=steps, first_order=True)
        return {**shared, **{k: v.detach() for k, v in path[-1].items()}}

    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        params = {k: v.detach() for k, v in named_params(self.model).items()}
        fn = self._task_fn(params, steps, first_order=True, objective=path_objective(self.kind))
        losses, accs = strategies.map_tasks(fn, batch, self.strategy)
        return losses.detach(), accs.detach()


@register("maml")
def build(model: nn.Module, cfg) -> MAML:
    return MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=cfg.first_order,
                loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps, strategy=cfg.strategy,
                adapt_filter=name_filter(cfg.adapt),
                chunk_size=cfg.chunk_size or None, bn_mode=cfg.bn_mode, checkpoint_inner=cfg.checkpoint_inner)


@register("fomaml")
def build_fomaml(model: nn.Module, cfg) -> MAML:
    """First-order MAML (Finn et al. 2017, §5.2): the meta-gradient is ∇L_q(θ')."""
    return MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=True,
                loss_fn=cfg.loss, test_inner_steps=cfg.test_inner_steps, strategy=cfg.strategy,
                adapt_filter=name_filter(cfg.adapt),
                chunk_size=cfg.chunk_size or None, name="fomaml", bn_mode=cfg.bn_mode,
                checkpoint_inner=cfg.checkpoint_inner)
