"""Parameters as data: run a plain ``nn.Module`` with a dict of tensors.

Everything in mamlkit treats a model's parameters as a ``dict[str, Tensor]`` and runs the
model through :func:`torch.func.functional_call`, so any ``nn.Module`` works unchanged.

This module also holds the fix for a correctness trap of ``torch.vmap``: in torch 2.x the
batching rules of the fused normalisation kernels (``batch_norm``, ``instance_norm``,
``layer_norm``) give second-order meta-gradients that are off by about 1e-2 relative, even
in float64, while the per-task loop agrees with finite differences. :class:`ExactNorms` is a
``TorchFunctionMode`` that reroutes those functions to compositions of primitive ops
(mean, var, rsqrt), whose derivatives of every order batch exactly. It works at the level of
``torch.nn.functional`` and ``torch.*``, so it covers every module and any user code that
calls these functions, not just the layers mamlkit ships. ``group_norm`` is exact natively.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

Params = dict[str, Tensor]

# What :func:`call` runs for a module: the module itself, unless the executor installed a view (under
# its compiled-kernel mode, a layer list with fused blocks; see mamlkit.exec.kernels.fusion). The math
# here does not know that a fast path exists; the executor plugs it in with :func:`set_module_view`.
_module_view: Callable[[nn.Module], nn.Module] = lambda model: model  # noqa: E731 - replaced by set_module_view


def set_module_view(view: Callable[[nn.Module], nn.Module]) -> None:
    """Make :func:`call` run ``view(model)`` instead of ``model`` (same parameter and buffer names)."""
    global _module_view
    _module_view = view


def named_params(model: nn.Module, adapt_filter: Callable[[str], bool] | None = None) -> Params:
    """The model's parameters as a dict, optionally only those whose name passes ``adapt_filter``."""
    return {k: v for k, v in model.named_parameters() if adapt_filter is None or adapt_filter(k)}


def named_buffers(model: nn.Module) -> Params:
    """The model's buffers as a dict (running statistics, masks, constants)."""
    return dict(model.named_buffers())


def call(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Run ``model(x)`` with ``params`` and ``buffers`` in place of its own tensors.

    ``params`` may hold a subset of the parameters; the rest come from the module itself.
    This is the documented way to run a model with adapted parameters::

        fast = learner.adapt(support_x, support_y)
        y = mamlkit.engine.functional.call(learner.model, fast, learner.buffers(), query_x)
    """
    return torch.func.functional_call(_module_view(_local(model)), (dict(params), dict(buffers)), (x,),
                                      strict=False)


# functional_call swaps a module's tensors for the call's duration, so a module must not run in two
# threads at once. The threads strategy's workers run on per-thread replicas: the same parameter and
# buffer objects (so a subset in ``params`` still falls back to the module's own), with their own
# module objects.
_THREAD = threading.local()


@contextlib.contextmanager
def thread_replicas() -> Iterator[None]:
    """Within the block, :func:`call` runs this thread's replica of each module."""
    if getattr(_THREAD, "replicas", None) is None:
        _THREAD.replicas = weakref.WeakKeyDictionary()
    depth = getattr(_THREAD, "depth", 0)
    _THREAD.depth = depth + 1
    try:
        yield
    finally:
        _THREAD.depth = depth


def _local(model: nn.Module) -> nn.Module:
    if not getattr(_THREAD, "depth", 0):
        return model
    tensors = [*model.parameters(), *model.buffers()]
    key = tuple(map(id, tensors))
    replica, known = _THREAD.replicas.get(model, (None, None))
    if known != key:  # first use, or the model's tensors were replaced since
        replica = copy.deepcopy(model, memo={id(t): t for t in tensors})
        _THREAD.replicas[model] = (replica, key)
    return replica


# --------------------------------------------------------------------------------------
# Exact normalisation under vmap


def _stats(x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    return mean, var


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5, *_, **__):
    # Running statistics are read, never written: inside meta-learning the model is called
    # once per task and per inner step, so an in-place update would depend on the execution
    # strategy. Batch statistics are used whenever training is on, as the MAML paper does.
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        mean, var = _stats(input, [0] + list(range(2, input.dim())))
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _affine((input - mean) * torch.rsqrt(var + eps), weight, bias, shape)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5, *_, **__):
    shape = [1, -1] + [1] * (input.dim() - 2)
    if use_input_stats or running_mean is None:
        mean, var = _stats(input, list(range(2, input.dim())))
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _affine((input - mean) * torch.rsqrt(var + eps), weight, bias, shape)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_, **__):
    n = len(normalized_shape)
    mean, var = _stats(input, list(range(input.dim() - n, input.dim())))
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, *_, **__):
    # torch.batch_norm orders its arguments differently from F.batch_norm
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                         *_, **__):
    return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


_EXACT: dict[Callable, Callable] = {
    F.batch_norm: _batch_norm,
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: _instance_norm,
    torch.instance_norm: _torch_instance_norm,
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
}


class ExactNorms(TorchFunctionMode):
    """Reroute fused normalisation kernels to exact composite ops (see module docstring).

    Used by the vmap execution strategy; the per-task loop keeps the fused kernels, which are
    exact there. A test checks both against finite differences for every norm layer in torch.nn.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = _EXACT.get(func)
        return (impl or func)(*args, **(kwargs or {}))
