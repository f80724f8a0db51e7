"""Batch norm → ReLU → max-pool blocks run as one compiled kernel in the per-task loop (issue 8).

Why: in Conv4 with max-pooling (the mini-ImageNet network, and Omniglot with ``pool=True``) the first
block's ``[N, 64, 28, 28]`` tensors make each op memory-bound. Run one by one, batch norm writes its
output, ReLU reads it and writes another, and max-pool reads that: ~100 MB of traffic per task that the
pooled result (a quarter of the size) does not need. :mod:`mamlkit.kernels` already fuses the backward of
``max_pool2d(relu(batch_norm(y)))`` when it sees the three calls; this module also removes the forward's
two full-size intermediates, which the kernels' op-by-op mode cannot (it must return each op's result).

How: the model is traced once with ``torch.fx`` (a copy of its call graph; the model is not changed),
and each ``BatchNorm2d → ReLU → MaxPool2d`` chain whose intermediates have no other use becomes one
:class:`FusedBlock`. Under :func:`mamlkit.kernels.fast`, a block runs the batch norm module itself for
its bookkeeping (``num_batches_tracked``, running statistics) with the statistics computed but no output
written, then the fused kernel from batch norm's input. Anything it does not cover (evaluation mode,
small or non-contiguous tensors, hooks, torch.func transforms) runs the three modules as they are.

Only models built entirely from ``torch.nn`` modules (``nn.Sequential`` of built-in layers, as
:func:`mamlkit.models.conv4`) are traced: tracing a custom ``forward`` would freeze its Python control
flow (``if self.training: ...``) at trace time. Other models run unchanged (the kernels' op-by-op fusion
of the backward still applies to them).
"""

from __future__ import annotations

import weakref

from torch import Tensor, fx, nn

from mamlkit import kernels

_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]] = weakref.WeakKeyDictionary()


def fused(model: nn.Module) -> nn.Module:
    """The module to run for ``model`` in this thread: its traced, fused copy while a
    :func:`mamlkit.kernels.fast` mode routes and the model has a fusable block, else ``model`` itself.
    The copy shares ``model``'s submodules, so parameter and buffer names and objects are the same."""
    if kernels.active_mode() is None:
        return model
    key = tuple(map(id, model.modules()))  # traced again if a submodule is replaced
    hit = _CACHE.get(model)
    if hit is None or hit[0] != key:
        traced = _trace_and_fuse(model)
        hit = key, model if traced is None else traced
        _CACHE[model] = hit
    return hit[1]


def _builtin(model: nn.Module) -> bool:
    return all(type(m).__module__.startswith("torch.nn.") for m in model.modules())


def _module_node(gm: fx.GraphModule, node: object, kind: type) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            and type(gm.get_submodule(node.target)) is kind)


def _trace_and_fuse(model: nn.Module) -> fx.GraphModule | None:
    if not _builtin(model):
        return None
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable: the model runs as it is
        return None
    blocks = 0
    for pool in list(gm.graph.nodes):
        if not _module_node(gm, pool, nn.MaxPool2d):
            continue
        act = pool.args[0]
        if not (_module_node(gm, act, nn.ReLU) and len(act.users) == 1):
            continue
        norm = act.args[0]
        if not (_module_node(gm, norm, nn.BatchNorm2d) and len(norm.users) == 1):
            continue
        name = f"mamlkit_fused_{blocks}"
        blocks += 1
        gm.add_submodule(name, FusedBlock(*(gm.get_submodule(n.target) for n in (norm, act, pool))))
        with gm.graph.inserting_before(pool):
            node = gm.graph.call_module(name, norm.args)
        pool.replace_all_uses_with(node)
        for old in (pool, act, norm):
            gm.graph.erase_node(old)
    if not blocks:
        return None
    gm.graph.lint()
    gm.recompile()
    return gm


class FusedBlock(nn.Module):
    """``pool(relu(norm(x)))`` with the original modules, through the fused kernel where it applies.
    The modules are held in a tuple, not registered, so the traced copy's parameter names are the model's."""

    def __init__(self, norm: nn.BatchNorm2d, act: nn.ReLU, pool: nn.MaxPool2d):
        super().__init__()
        self.parts = (norm, act, pool)

    def forward(self, x: Tensor) -> Tensor:
        norm, act, pool = self.parts
        mode = kernels.active_mode()
        window = _window(pool, x)
        if mode is None or window is None or not norm.training or _hooked(self.parts):
            return pool(act(norm(x)))
        mode.stats_only = True  # the module's own forward, for its bookkeeping; the mode computes statistics only
        try:
            out = norm(x)
        finally:
            mode.stats_only = False
        stats, mode.stats = mode.stats, None
        if stats is None:  # the mode did not take this batch norm: out is its real output
            return pool(act(out))
        return kernels.batch_norm_relu_max_pool(x, norm.weight, norm.bias, *stats, norm.eps, *window)


def _window(pool: nn.MaxPool2d, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Max-pool's kernel and stride where the fused kernel covers it (else None)."""
    kernel, stride = kernels._pair(pool.kernel_size, None), kernels._pair(pool.stride, pool.kernel_size)
    if (kernel is None or stride is None or pool.return_indices or pool.ceil_mode or not kernels._plain(x)
            or kernels._pair(pool.padding, 0) != (0, 0) or kernels._pair(pool.dilation, 1) != (1, 1)
            or min(*kernel, *stride) < 1 or kernel[0] * kernel[1] > 256 or x.shape[2] < kernel[0]
            or x.shape[3] < kernel[1] or not kernels._outside_transforms()):
        return None
    return kernel, stride


def _hooked(modules: tuple[nn.Module, ...]) -> bool:
    """Whether a hook would see the intermediate results that fusing skips."""
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules))
