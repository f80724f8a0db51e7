"""[Conv →] batch norm → ReLU → max-pool blocks run as one compiled kernel in the per-task loop.

Why: in Conv4 with max-pooling (the mini-ImageNet network, and Omniglot with ``pool=True``) the first
block's ``[N, 64, 28, 28]`` tensors make each op memory-bound. Run one by one, batch norm writes its
output, ReLU reads it and writes another, and max-pool reads that: ~100 MB of traffic per task that the
pooled result (a quarter of the size) does not need. :mod:`mamlkit.exec.kernels` fuses the backward of
``max_pool2d(relu(batch_norm(y)))`` when it sees the three calls; this module also removes the
forward's full-size intermediates, which an op-by-op mode cannot (it must return each op's result).
When the block starts with a convolution of a one-channel input (Omniglot's first layer), the
convolution is fused as well: it is recomputed from the small input wherever it is needed, so no
``[N, C, H, W]`` tensor is stored or read at all.

How: a model that is an ``nn.Sequential`` tree of built-in ``torch.nn`` layers (as
:func:`mamlkit.models.conv4`) runs as the flat list of its layers, in the order ``nn.Sequential`` runs
them, with each ``[Conv2d →] BatchNorm2d → ReLU → MaxPool2d`` run replaced by a :class:`FusedBlock`. The
list runs the model's own layer objects under the names ``functional_call`` swaps, so parameters,
buffers and running statistics are the model's. Under :func:`mamlkit.exec.kernels.fast`, a block does the
batch norm module's bookkeeping (``num_batches_tracked``, the running-statistics momentum) as
``nn.BatchNorm2d.forward`` does and calls the fused kernel; anything it does not cover (evaluation mode,
small or non-contiguous tensors, hooks, torch.func transforms) runs the layers as they are. Other models
(a ``forward`` of their own, whose control flow only running it can follow) run unchanged.
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from mamlkit.exec import kernels

_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]] = weakref.WeakKeyDictionary()


def fused(model: nn.Module) -> nn.Module:
    """The module to run for ``model`` in this thread: a :class:`FusedSequential` over its layers while a
    :func:`mamlkit.exec.kernels.fast` mode routes and it has a fusable block, else ``model`` itself."""
    if kernels.active_mode() is None:
        return model
    key = tuple(map(id, model.modules()))  # rebuilt if a layer is replaced
    hit = _CACHE.get(model)
    if hit is None or hit[0] != key:
        plan = _plan(model)
        hit = key, model if plan is None else FusedSequential(model, plan)
        _CACHE[model] = hit
    return hit[1]


def _layers(seq: nn.Sequential) -> list[nn.Module]:
    """The layers ``seq`` runs, in order, with nested ``nn.Sequential`` flattened."""
    out: list[nn.Module] = []
    for m in seq:
        out.extend(_layers(m) if type(m) is nn.Sequential else [m])
    return out


def _plan(model: nn.Module) -> list[nn.Module] | None:
    """The steps that run ``model``, or None when there is nothing to fuse or it is not a plain tree."""
    if type(model) is not nn.Sequential or not all(type(m).__module__.startswith("torch.nn.") for m in model.modules()):
        return None
    if any(next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
           for m in model.modules() if type(m) is nn.Sequential):
        return None
    layers, steps, i, blocks = _layers(model), [], 0, 0
    while i < len(layers):
        kinds = [type(m) for m in layers[i:i + 4]]
        if kinds[:3] == [nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]:
            steps.append(FusedBlock(None, *layers[i:i + 3]))
            i, blocks = i + 3, blocks + 1
        elif kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]:
            steps.append(FusedBlock(*layers[i:i + 4]))
            i, blocks = i + 4, blocks + 1
        else:
            steps.append(layers[i])
            i += 1
    return steps if blocks else None


class FusedSequential(nn.Module):
    """Runs ``model``'s layers as ``steps``. It registers ``model``'s children under their own names (the
    same objects), so its parameter and buffer names are the model's and ``functional_call`` on it swaps
    the tensors that the steps' layers use."""

    def __init__(self, model: nn.Sequential, steps: list[nn.Module]):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.steps = tuple(steps)  # a tuple: not registered, so no second set of names
        self.containers = tuple(m for m in model.modules() if type(m) is nn.Sequential)
        self.model = (model,)

    def forward(self, x: Tensor) -> Tensor:
        if _hooked(self.containers):  # a container's hook would not run here: run the model itself
            return self.model[0](x)
        for step in self.steps:
            x = step(x)
        return x


class FusedBlock(nn.Module):
    """``pool(relu(norm(conv(x))))`` with the model's own layers (``conv`` optional), through the fused
    kernel where it applies. The layers are held in a tuple, not registered as children."""

    def __init__(self, conv: nn.Conv2d | None, norm: nn.BatchNorm2d, act: nn.ReLU, pool: nn.MaxPool2d):
        super().__init__()
        self.parts = (conv, norm, act, pool)

    def forward_modules(self, x: Tensor) -> Tensor:
        conv, norm, act, pool = self.parts
        return pool(act(norm(conv(x) if conv is not None else x)))

    def forward(self, x: Tensor) -> Tensor:
        conv, norm, act, pool = self.parts
        mode = kernels.active_mode()
        if mode is None or not norm.training or _hooked(self.parts):
            return self.forward_modules(x)
        if conv is not None and kernels.conv_fusable(x, conv):
            window = _window(pool, kernels.conv_output_shape(x, conv))
            if window is not None and _norm_fusable(norm, kernels.conv_output_shape(x, conv), x):
                momentum, running = _bookkeeping(norm)
                mode.hits += 1  # kernels used: kernels.fast keeps the mode for this code
                return kernels.conv_batch_norm_relu_max_pool(
                    x, conv.weight, conv.bias, conv.padding, norm.weight, norm.bias, *running, momentum, norm.eps,
                    *window)
        y = conv(x) if conv is not None else x
        window = _window(pool, y.shape)
        if window is None or not kernels._plain(y) or not _norm_fusable(norm, y.shape, y):
            return pool(act(norm(y)))
        momentum, running = _bookkeeping(norm)
        mode.hits += 1
        mean, invstd = kernels.batch_stats(y, *running, momentum, norm.eps)
        return kernels.batch_norm_relu_max_pool(y, norm.weight, norm.bias, mean, invstd, norm.eps, *window)


def _norm_fusable(norm: nn.BatchNorm2d, shape, like: Tensor) -> bool:
    """Whether ``norm``'s tensors suit the kernels for its input of ``shape`` (dtype and device of ``like``)."""
    tensors = [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None]
    return (len(shape) == 4 and shape[1] == norm.num_features and shape[0] * shape[2] * shape[3] > 1
            and all(type(t) in (Tensor, nn.Parameter) and t.dtype == like.dtype and t.device == like.device
                    and t.dim() == 1 and t.is_contiguous() for t in tensors))


def _bookkeeping(norm: nn.BatchNorm2d) -> tuple[float, tuple[Tensor | None, Tensor | None]]:
    """What ``nn.BatchNorm2d.forward`` does in training mode before it calls ``F.batch_norm``: count the
    batch, and pick the running-statistics momentum (a cumulative average when ``momentum`` is None)."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return momentum, (norm.running_mean, norm.running_var) if norm.track_running_stats else (None, None)


def _window(pool: nn.MaxPool2d, shape) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Max-pool's kernel and stride where the fused kernel covers it (else None)."""
    kernel, stride = kernels._pair(pool.kernel_size, None), kernels._pair(pool.stride, pool.kernel_size)
    if (kernel is None or stride is None or pool.return_indices or pool.ceil_mode or len(shape) != 4
            or kernels._pair(pool.padding, 0) != (0, 0) or kernels._pair(pool.dilation, 1) != (1, 1)
            or min(*kernel, *stride) < 1 or kernel[0] * kernel[1] > 256 or shape[2] < kernel[0]
            or shape[3] < kernel[1] or not kernels._outside_transforms()):
        return None
    return kernel, stride


def _hooked(modules) -> bool:
    """Whether a hook would see the intermediate results that fusing skips."""
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules if mod is not None))
