"""The one driver that turns an algorithm's pieces into a meta-learner.

An algorithm file supplies only what differs (:class:`Pieces`): which parameters adapt, the inner rule,
the outer objective, first order or not, extra meta-parameters and a step hook; where its per-task
function is not the unrolled inner loop (ANIL's features computed once, Reptile's and iMAML's outer
directions), that builder. :class:`Driver` is not a base class: every algorithm is a ``Driver`` built
from its pieces, and the per-task functions it builds run on the :class:`~mamlkit.exec.executor.Executor`.

A builder is ``task(learner, theta, rule, *, steps, first_order, objective) -> fn(sx, sy, qx, qy)`` with
``theta`` the starting parameters θ0 (with their graph to the meta-parameters in training, detached in
evaluation) and ``rule`` the inner rule over the current extra meta-parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mamlkit.algorithms import resolve_loss
from mamlkit.base.batch import TaskBatch
from mamlkit.base.choices import BN_MODES, check_choice
from mamlkit.base.errors import UserError
from mamlkit.engine.functional import Params, call, named_buffers, named_params
from mamlkit.engine.inner import (
    LossFn,
    Objective,
    adapt_final,
    fresh,
    make_task_fn,
    path_objective,
    query_objective,
    split_params,
    support_loss_fn,
    trainable_filter,
)
from mamlkit.engine.norms import with_bn_mode
from mamlkit.engine.outputs import OutputSpec, output_selector
from mamlkit.engine.rules import InnerRule, descent_guard, sgd
from mamlkit.exec.executor import Executor
from mamlkit.exec.strategies import TaskFn, Work, log, task_metrics

TaskBuilder = Callable[..., TaskFn]


def _constant(value):
    return lambda step: value


@dataclass(frozen=True, kw_only=True)
class Pieces:
    """What one algorithm supplies; everything else is the driver's.

    Args:
        name: the name logged and saved in checkpoints.
        inner_steps, test_inner_steps: K in training, and at evaluation and in ``adapt``.
        adapts: which parameters adapt, by name (``None``: all).
        rule: ``rule(extras) -> InnerRule`` from the extra meta-parameters (default: SGD at ``inner_lr``).
        inner_lr: α of the default rule.
        objective: ``objective(step) -> Objective``, the outer objective at a training step (default:
            the query loss at θ_K).
        first_order: ``first_order(step) -> bool`` (drop the Hessian terms at that step).
        extras: extra meta-parameters by their checkpoint names (``inner_lr/<param>``).
        replaces: model parameters an extra stands in for (no longer meta-parameters themselves).
        start: ``start(params, extras) -> θ0`` (default: the model's parameters).
        inner_loss: ``inner_loss(loss, θ0) -> loss``: the inner objective from the support loss (iMAML's
            proximal term); default: the support loss itself.
        task: the per-task builder, for training and evaluation (default: :func:`unrolled`).
        outer: the per-task builder for training only, where the meta-gradient is not the unrolled path's
            (Reptile's θ − φ, iMAML's implicit gradient); default: ``task``.
        inner_view: ``inner_view(learner, theta, x) -> (loss, fast, x, finish)``: where ``adapt``'s inner loop
            runs: the support loss ``loss(fast, x, y)`` of the parameters ``fast`` that adapt, on inputs ``x``,
            and ``finish(fast) -> params``, every parameter after adapting (ANIL: the head on the body's
            features). Default: the model, the parameters that pass ``adapts``.
        compilable: whether ``task`` traces under ``torch.compile`` (strategy ``compile``).
        info: algorithm-specific read-only attributes of the learner (ANIL's ``head_name``, MAML++'s ``bn``).
    """

    name: str
    inner_steps: int
    test_inner_steps: int | None = None
    adapts: Callable[[str], bool] | None = None
    inner_lr: float = 0.01
    rule: Callable[[Params], InnerRule] | None = None
    objective: Callable[[int], Objective] = _constant(query_objective)
    first_order: Callable[[int], bool] = _constant(False)
    extras: Mapping[str, nn.Parameter] = field(default_factory=dict)
    replaces: frozenset[str] = frozenset()
    start: Callable[[Params, Params], Params] | None = None
    inner_loss: Callable[[Callable, Params], Callable] | None = None
    task: TaskBuilder | None = None
    outer: TaskBuilder | None = None
    inner_view: Callable[..., tuple[Callable, Params, Tensor, Callable[[Params], Params]]] | None = None
    compilable: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)


def unrolled(learner: Driver, theta: Params, rule: InnerRule, *, steps: int, first_order: bool,
             objective: Objective) -> TaskFn:
    """The per-task function of the MAML family: ``steps`` inner updates of the parameters that adapt,
    differentiated through (unless first order), then the outer objective under the batch-norm mode."""
    pieces = learner.pieces
    return make_task_fn(learner.model, theta, learner.buffers(), loss_fn=learner.loss_fn, rule=rule, steps=steps,
                        first_order=first_order, adapt_filter=pieces.adapts,
                        objective=with_bn_mode(objective, learner.bn_mode),
                        checkpoint=learner.executor.checkpoint_inner, inner=pieces.inner_loss, output=learner.output)


def _model_view(learner: Driver, theta: Params, x: Tensor
                ) -> tuple[Callable, Params, Tensor, Callable[[Params], Params]]:
    """``adapt``'s default inner view: the whole model, the parameters that pass ``adapts`` (and are not frozen)
    adapt, the rest are shared (see :attr:`Pieces.inner_view`)."""
    fast, shared = split_params(theta, trainable_filter(learner.model, learner.pieces.adapts))
    loss = support_loss_fn(learner.model, learner.loss_fn, shared, learner.buffers(), learner.output)
    return loss, fast, x, lambda adapted: {**shared, **adapted}


def config_keywords(cfg: Any, executor: Executor) -> dict[str, Any]:
    """The keywords every algorithm of the MAML family takes from a :class:`~mamlkit.config.TrainConfig`."""
    return dict(inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=cfg.first_order, loss_fn=cfg.loss,
                test_inner_steps=cfg.test_inner_steps, bn_mode=cfg.bn_mode, executor=executor, output=cfg.output_spec)


def thread_planned(executor_of: Callable[[Any], Executor] = lambda learner: learner.executor) -> Callable:
    """A decorator: run a learner's call under its executor's thread plan (``executor_of(self)``), and give
    the caller's thread settings back when it returns (:meth:`~mamlkit.exec.executor.Executor.planned`)."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with executor_of(self).planned():
                return method(self, *args, **kwargs)
        return run
    return wrap


class Driver:
    """A meta-learner built from an algorithm's :class:`Pieces`; satisfies
    :class:`~mamlkit.algorithms.MetaLearner`. Its tasks run on ``executor``; ``output`` selects the tensor of
    the model's output that the loss takes (:mod:`mamlkit.engine.outputs`)."""

    def __init__(self, model: nn.Module, pieces: Pieces, *, loss_fn: str | LossFn = "mse", kind: str | None = None,
                 bn_mode: str = "transductive", executor: Executor | None = None, output: OutputSpec = None,
                 **execution):
        check_choice("bn_mode", bn_mode, BN_MODES)
        self.output = output_selector(output)
        loss_fn, kind = resolve_loss(loss_fn, kind)
        executor = executor or Executor(model, **execution)
        if pieces.inner_steps < 0 or (pieces.test_inner_steps is not None and pieces.test_inner_steps < 0):
            raise ValueError("inner_steps and test_inner_steps must be >= 0")
        if executor.strategy.compiled and not pieces.compilable:
            raise UserError(f"--strategy compile is not available for --algo {pieces.name}; use auto, vmap or loop")
        self.model, self.pieces, self.executor = model, pieces, executor
        self.name, self.loss_fn, self.kind, self.bn_mode = pieces.name, loss_fn, kind, bn_mode
        self.inner_steps = pieces.inner_steps
        self.test_inner_steps = pieces.inner_steps if pieces.test_inner_steps is None else pieces.test_inner_steps
        self.compilable = pieces.compilable
        self.step = 0
        self._output_checked = False
        self._task = pieces.task or unrolled
        self._outer = pieces.outer or self._task
        log.info("mamlkit: %s runs tasks with strategy %s", self.name, executor.strategy.name)

    def __getattr__(self, name: str) -> Any:
        info = self.__dict__.get("pieces")
        if info is not None and name in info.info:
            return info.info[name]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name', '')!r} has no attribute {name!r}")

    # --- state ---------------------------------------------------------------------------------------

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """Everything the outer optimiser updates: the model's parameters and the algorithm's extras."""
        own = {k: v for k, v in self.model.named_parameters() if k not in self.pieces.replaces}
        return own | dict(self.pieces.extras) if self.pieces.extras else own

    def buffers(self) -> dict[str, Tensor]:
        return named_buffers(self.model)

    def set_step(self, step: int) -> None:
        """Called by the trainer before each meta-iteration (step-dependent objectives, first order)."""
        self.step = step

    def tune(self, batch: TaskBatch) -> str:
        """Run ``auto``'s trial on ``batch`` now (otherwise it runs on the first meta-loss); returns the
        strategy kept."""
        self.check_output(batch.support_x[0])
        self.executor.ready(self.work(), batch)
        return self.executor.strategy.name

    def work(self) -> Work:
        """What the executor runs for a meta-gradient at the current step: the training per-task builder (the
        algorithm's outer direction where it has one) and the meta-parameters."""
        return Work(self._train_fn, self.meta_parameters(), self.compilable)

    # --- building per-task functions -----------------------------------------------------------------

    def support_loss(self) -> Callable[[Params, Tensor, Tensor], Tensor]:
        """``L(params, x, y)``: the loss of the model run with ``params`` (all of them) on one task's data."""
        return support_loss_fn(self.model, self.loss_fn, {}, self.buffers(), self.output)

    def predict(self, params: Params, x: Tensor) -> Tensor:
        """The model's prediction on ``x`` with ``params`` (all of them): the tensor ``output`` selects from its
        output; buffers copied (see ``fresh``)."""
        return self.output(call(self.model, params, fresh(self.buffers()), x))

    def check_output(self, x: Tensor) -> None:
        """Run the model once on ``x`` (one task's inputs) and select its prediction, the first time only: a
        selector that does not fit what the model returns is then one clear error before any strategy runs,
        not a failure of every candidate in ``auto``'s trial. No gradient, and no draw from the RNG streams.
        Under a dispatch mode (the executor's memory probe) it waits for a plain call: the probe's forward would
        be measured as the call's own memory."""
        if self._output_checked:  # every meta-iteration asks: the answer costs one attribute after the first
            return
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is not None:
            return
        self._output_checked = True
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            try:
                out = call(self.model, {k: v.detach() for k, v in named_params(self.model).items()},
                           fresh(self.buffers()), x)
            except Exception:  # noqa: BLE001 - what the plain forward cannot do, the strategies report as before
                return
            self.output(out)

    def _start(self, meta: Mapping[str, Tensor] | None, guard: bool = False) -> tuple[Params, InnerRule]:
        """θ0 and the inner rule from ``meta`` (the meta-parameters, live or traced), or, with ``None``,
        from detached copies (evaluation); ``guard``: the rule within :func:`~mamlkit.engine.rules.descent_guard`."""
        if meta is None:
            params = {k: v.detach() for k, v in named_params(self.model).items()}
            extras = {k: v.detach() for k, v in self.pieces.extras.items()}
        else:
            params = {k: meta.get(k, v) for k, v in named_params(self.model).items()}
            extras = {k: meta[k] for k in self.pieces.extras}
        pieces = self.pieces
        theta = pieces.start(params, extras) if pieces.start else params
        rule = pieces.rule(extras) if pieces.rule else sgd(pieces.inner_lr)
        return theta, descent_guard(rule) if guard else rule

    def _train_fn(self, meta: Mapping[str, Tensor]) -> TaskFn:
        theta, rule = self._start(meta)
        return self._outer(self, theta, rule, steps=self.inner_steps, first_order=self.pieces.first_order(self.step),
                           objective=self.pieces.objective(self.step))

    # --- the MetaLearner protocol ---------------------------------------------------------------------

    @thread_planned()
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        self.check_output(batch.support_x[0])
        work = self.work()
        self.executor.ready(work, batch)
        losses, preds = self.executor.map_tasks(work.build(work.params), batch)
        loss = losses.mean()
        self.executor.plan_backward(loss)  # the caller's loss.backward() runs under the plan too
        return loss, task_metrics(losses, preds, batch.query_y, self.kind)

    @thread_planned()
    def meta_backward(self, batch: TaskBatch, weight: float = 1.0) -> dict[str, float]:
        self.check_output(batch.support_x[0])
        losses, preds = self.executor.backward(self.work(), batch, weight)
        return task_metrics(losses, preds, batch.query_y, self.kind)

    @thread_planned()
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None, *,
              guard: bool = False) -> dict[str, Tensor]:
        """Adapt to one task; returns every parameter (adapted or shared), detached.

        ``support_x [N, *x_shape]``, ``support_y [N, *y_shape]``. ``guard``: wrap the inner rule in
        :func:`~mamlkit.engine.rules.descent_guard` (a step that would raise the support loss is halved). Run
        the model with the result via ``mamlkit.engine.functional.call(learner.model, params, learner.buffers(), x)``.
        """
        steps = self.test_inner_steps if steps is None else steps
        self.check_output(support_x)
        theta, rule = self._start(None, guard)
        view = self.pieces.inner_view or _model_view
        loss, fast, x, finish = view(self, theta, support_x)
        if self.pieces.inner_loss is not None:
            loss = self.pieces.inner_loss(loss, fast)
        # no meta-gradient here: only the current iterate is kept, so memory does not grow with ``steps``
        # (the same updates as adapt_path's first-order path, whose every step a meta-gradient would need)
        return finish(adapt_final(loss, fast, x, support_y, rule=rule, steps=steps))

    @thread_planned()
    def adapted_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor]:
        """Query loss and accuracy ``[T, steps+1]`` after 0..steps inner steps (evaluation)."""
        return self._path_losses(batch, steps, guard=False)

    @thread_planned()
    def guarded_losses(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`adapted_losses` with the inner rule wrapped in :func:`~mamlkit.engine.rules.descent_guard`,
        and ``halved [T, steps+1]``: True where that step of that task was halved."""
        losses, stats = self._path_losses(batch, steps, guard=True)
        return losses, stats[:, 0], stats[:, 1] > 0

    def _path_losses(self, batch: TaskBatch, steps: int, guard: bool) -> tuple[Tensor, Tensor]:
        self.check_output(batch.support_x[0])
        theta, rule = self._start(None, guard)
        fn = self._task(self, theta, rule, steps=steps, first_order=True,
                        objective=path_objective(self.kind, halvings=guard))
        losses, stats = self.executor.evaluate_tasks(fn, batch)  # or in the loop, where vmap cannot run the model
        return losses.detach(), stats.detach()

    def describe(self, guard: bool = False) -> str:
        """The test-time inner rule in words (``guard``: within the descent safeguard), as reports and
        ``mamlkit adapt`` print it: e.g. "SGD at α=0.01", and which parameters it adapts when not all of them
        ("on 2 of 6 parameter tensors (head.weight, head.bias)": ANIL)."""
        theta, rule = self._start(None, guard)
        fast, _ = split_params(theta, trainable_filter(self.model, self.pieces.adapts))
        if len(fast) == len(theta):
            return rule.describe()
        names = ", ".join(list(fast)[:4]) + (", ..." if len(fast) > 4 else "")
        return f"{rule.describe()}, on {len(fast)} of {len(theta)} parameter tensors ({names})"

    def __repr__(self) -> str:
        return f"Driver({self.name}, {self.executor!r})"
