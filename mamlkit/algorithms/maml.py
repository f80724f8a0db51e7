"""MAML (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400) and first-order MAML.

Pieces: every parameter adapts (or those passing ``adapt_filter``), the inner rule is SGD at
rate α, the outer objective is the query loss after K steps, second order unless
``first_order=True``. Everything else is the shared driver's (:mod:`mamlkit.algorithms.driver`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mamlkit.algorithms import register
from mamlkit.algorithms.driver import Driver, Pieces, config_keywords
from mamlkit.engine.inner import Objective, name_filter, query_objective
from mamlkit.engine.outputs import OutputSpec
from mamlkit.exec.executor import Executor


def MAML(model: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
         loss_fn: str | Callable[[Tensor, Tensor], Tensor] = "mse", kind: str | None = None,
         adapt_filter: Callable[[str], bool] | None = None, test_inner_steps: int | None = None,
         strategy: str = "auto", chunk_size: int | None = None, checkpoint_inner: bool = False,
         objective: Objective = query_objective, name: str = "maml", bn_mode: str = "transductive",
         executor: Executor | None = None, output: OutputSpec = None, **execution) -> Driver:
    """Model-agnostic meta-learning over any ``nn.Module``.

    Args:
        model: any module; it is called as ``model(x)`` through ``functional_call``. It may return a tensor, a
            tuple, a dict or a Hugging Face ``ModelOutput``; ``output`` picks the tensor the loss takes.
        inner_lr: α, the inner SGD rate (paper: 0.01 sinusoid, 0.4 Omniglot 5-way).
        inner_steps: K inner steps during meta-training.
        first_order: FOMAML: drop the Hessian terms of the meta-gradient.
        loss_fn: ``loss(pred, target) -> scalar``, or ``"mse"`` / ``"cross_entropy"``; ``pred`` is the selected
            output ``[N, ...]``.
        output: which tensor of the model's output is the prediction (:mod:`mamlkit.engine.outputs`):
            ``None`` the tensor itself, a ``ModelOutput``'s or dict's ``logits``, or a one-element tuple's
            element (anything else is refused); ``"logits"`` a key or attribute; ``0`` an index; or a
            function ``output(raw) -> Tensor``. The other algorithms take it too.
        kind: ``"regression"`` or ``"classification"``; inferred from a named ``loss_fn``.
        adapt_filter: which parameters adapt, by name (default: all). ANIL adapts ``head.*``.
        test_inner_steps: K at evaluation and in ``adapt`` (default: ``inner_steps``).
        strategy, chunk_size, checkpoint_inner: how tasks run, forwarded to the
            :class:`~mamlkit.exec.executor.Executor` with any further execution keywords
            (``memory_budget_mb``, ``iterations``, ``fast_kernels``, ``threads``: the thread plan of every
            call, see :mod:`mamlkit.exec.threads`). ``strategy="auto"`` measures the
            candidates on the first ``meta_loss``/``meta_backward`` call (or ``learner.tune(batch)``).
        objective: the outer objective (default: query loss at θ_K; see :mod:`mamlkit.engine.inner`).
        bn_mode: ``"transductive"`` (batch statistics of the query batch, the paper) or ``"support"``
            (query predictions use support-set batch-norm statistics; see :mod:`mamlkit.engine.norms`).
        name: the name logged and saved in checkpoints.
        executor: an executor built elsewhere (the trainer's, from the config), instead of the keywords.

    Example::

        learner = MAML(model, inner_lr=0.01, inner_steps=1, loss_fn="mse")
        loss, metrics = learner.meta_loss(batch)   # batch: TaskBatch with T tasks
        loss.backward()                            # .grad on model.parameters()
    """
    pieces = Pieces(name=name, inner_steps=inner_steps, test_inner_steps=test_inner_steps, adapts=adapt_filter,
                    inner_lr=inner_lr, objective=lambda step: objective, first_order=lambda step: first_order,
                    compilable=True)
    return Driver(model, pieces, loss_fn=loss_fn, kind=kind, bn_mode=bn_mode, executor=executor, strategy=strategy,
                  chunk_size=chunk_size, checkpoint_inner=checkpoint_inner, output=output, **execution)


@register("maml")
def build(model: nn.Module, cfg, executor: Executor) -> Driver:
    """MAML (Finn et al. 2017): second-order meta-gradient through the inner SGD steps."""
    return MAML(model, **config_keywords(cfg, executor), adapt_filter=name_filter(cfg.adapt))


@register("fomaml")
def build_fomaml(model: nn.Module, cfg, executor: Executor) -> Driver:
    """First-order MAML (Finn et al. 2017, §5.2): the meta-gradient is ∇L_q(θ')."""
    return MAML(model, **config_keywords(cfg, executor) | {"first_order": True}, name="fomaml",
                adapt_filter=name_filter(cfg.adapt))
