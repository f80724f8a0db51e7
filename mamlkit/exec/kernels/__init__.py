"""Faster CPU kernels for max-pooling and batch norm on NCHW tensors, with torch's numbers.

Why: on the CPU, torch's kernels for ``max_pool2d_with_indices`` and training-mode ``batch_norm`` on
contiguous (NCHW) tensors are scalar loops. On the first block of Conv4 with 15 queries per class
(a ``[75, 64, 28, 28]`` tensor, 1 thread) they take 20-25 ms and 8-11 ms, against ~1.5 and ~2.5 ms
for the same ops on a channels-last copy; with batch norm's backward they are about a quarter of a
second-order MAML iteration (docs/performance-notes.md). The peers (learn2learn, higher, a plain loop)
all run them. Converting to channels-last costs as much as it saves, so this module compiles a few small
C loops instead and routes ``F.max_pool2d`` and ``F.batch_norm`` to them while the per-task loop runs
(:func:`fast`): 6.4 and 4.7 ms on that tensor.

Max-pool of ReLU of batch norm (Conv4's block) also runs as one fused kernel from batch norm's input
(:class:`_BatchNormReLUMaxPool`): the mode fuses the backward when it sees the three calls in turn, and
:mod:`mamlkit.exec.kernels.fusion` the forward too, running the model's layers as a list (and a
one-channel convolution before the block as well). Its saved state is batch norm's input, the pooled
output and a byte per window, instead of three full-size tensors and int64 indices, so a task's graph
takes less memory as well.

The window loops run over a whole plane's outputs through a table of window starts, so that they
vectorise (gathers) with no data-dependent branch: row by row (14 outputs) they did not, and branches
on activations mispredict about half the time.

Exactness: the forward passes and batch norm's first-order backward are compiled. Every backward that
is itself differentiated (the inner loop's, under ``create_graph``) is torch's own
(``max_pool2d_with_indices_backward``, ``native_batch_norm_backward``) on the same saved tensors, so
second and higher derivatives are torch's too.

* Max-pooling returns the same values and the same indices as torch, bit for bit, ties and NaNs
  included (the first maximum of a window in row-major order; a NaN wins; tested).
* Batch norm sums in double, so its statistics differ from torch's in the last float32 bit
  (1e-7 relative), as any two summation orders do; in float64 the difference is ~1e-16.

Anything else (channels-last or non-contiguous tensors, padding, dilation, ceil mode, other dtypes,
tensors under :data:`MIN_ELEMENTS`, evaluation-mode batch norm, torch.func transforms,
``torch.compile``, autocast) goes to torch unchanged.

Building: the C source is ``kernels.c`` (with ``kernels_typed.h``, once per element type), shipped as
package data. The first use in a process compiles it with the system C compiler (``$CC``, else ``cc`` or
``gcc``; ``-O3 -march=native -fopenmp``, else without ``-march=native``) in a temporary folder, loads it
and removes the folder: 1.2 s of CPU time, once per process, never cached on disk. The tests build it with
``-Wall -Wextra -Werror``. Without a compiler, or when the build fails, everything runs on torch and a
warning says so, once per process.

Calls: each kernel is an operator of the ``mamlkit`` namespace (``torch.ops.mamlkit.max_pool2d``, ...,
defined with ``torch.library``), whose CPU implementation allocates the outputs and calls the compiled
function through ctypes, so the dispatcher, the profiler and tracing tools see each call by name. It costs
nothing measurable against calling the implementation directly (benchmarks/kernel_dispatch.py, 1 thread,
min of 11 interleaved rounds, on a 2-core machine shared with other jobs; 2 threads gave the same
overhead): 2.9-4.5 us more per call
(6.0-7.3 us direct, 8.6-11.8 us through the dispatcher, on a [1, 1, 2, 2] tensor), against 4.7-34 ms per
op on [75, 64, 28, 28] (max-pool 4.66 -> 4.89 ms, fused block forward 5.64 -> 6.27 ms, its backward
33.7 -> 35.2 ms: within the run's noise) and 0.06-1.4 ms at :data:`MIN_ELEMENTS`. A meta-iteration makes
few calls: 20 per iteration for Omniglot 5-way with max-pool and 15 queries (4 tasks), 78 for
mini-ImageNet (2 tasks, 5 steps), which is < 0.01% of its time at 4 us a call.
``torch.library.custom_op`` costs 10-30 us a call instead, so the plain ``Library`` registration is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.resources
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

log = logging.getLogger("mamlkit")

# The C source: kernels.c includes kernels_typed.h once per element type (package data, next to this file).
_SOURCES = ("kernels.c", "kernels_typed.h")
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# -march=native: built on the machine it runs on, in this process. Falls back to a portable build.
_ARCHES = (("-march=native",), ())
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_I64, _INT, _DBL, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p

_enabled = os.environ.get("MAMLKIT_FAST_KERNELS", "1") != "0"
_lib: ctypes.CDLL | None | bool = False  # False: not built yet; None: unavailable
_lib_lock = threading.Lock()


def set_enabled(flag: bool) -> None:
    """Turn the fast kernels on or off for this process (``mamlkit train --no-fast-kernels``)."""
    global _enabled
    _enabled = bool(flag)


def available() -> bool:
    """Whether the kernels are enabled and compiled (compiles them on the first call)."""
    return _enabled and _library() is not None


def _library() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        with _lib_lock:
            if _lib is False:
                _lib = _build()
    return _lib  # type: ignore[return-value]


def _compile(cc: str, directory: str, arch: tuple[str, ...] = (), warnings: tuple[str, ...] = ()
             ) -> tuple[str, subprocess.CompletedProcess]:
    """Copy the C source into ``directory`` and compile it there with ``cc`` into a shared library; returns
    its path and the compiler's result. The source is read through importlib.resources, so that it is found
    wherever the package is installed."""
    files = importlib.resources.files(__name__)
    for name in _SOURCES:
        with open(os.path.join(directory, name), "w") as f:
            f.write(files.joinpath(name).read_text())
    src, lib = os.path.join(directory, _SOURCES[0]), os.path.join(directory, "kernels.so")
    proc = subprocess.run([cc, *_FLAGS, *arch, *warnings, src, "-o", lib], capture_output=True, text=True,
                          timeout=120)
    return lib, proc


def _unavailable(reason: str, *args: object) -> None:
    """Say, once per process (the build runs once), that the kernels fell back to torch's. A warning, not
    info: an unannounced fallback is a slowdown nobody sees (the CLI shows warnings and hides info)."""
    log.warning("mamlkit: " + reason + "; max-pooling and batch norm use torch's slower NCHW CPU kernels "
                "(install a C compiler such as gcc, or point CC at one, for the fast ones; --no-fast-kernels, "
                "or MAMLKIT_FAST_KERNELS=0 outside the trainer, turns them off)", *args)


def _build() -> ctypes.CDLL | None:
    """Compile and load the kernels, in a temporary folder that is removed once the library is loaded: they
    are built once per process (1.2 s of CPU time) and never cached on disk, so a changed compiler or
    CPU never meets a stale library."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _unavailable("no C compiler found (CC is unset and neither cc nor gcc is on PATH)")
        return None
    tmp = tempfile.mkdtemp(prefix="mamlkit-kernels-")
    try:
        for arch in _ARCHES:
            lib, proc = _compile(cc, tmp, arch)
            if proc.returncode == 0:
                break
        else:
            _unavailable("building the fast CPU kernels failed (%s)",
                         proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else proc.returncode)
            return None
        handle = ctypes.CDLL(lib)
        for sfx in _SUFFIX.values():
            getattr(handle, f"maxpool2d_{sfx}").argtypes = [_PTR] * 3 + [_I64] * 9 + [_INT]
            getattr(handle, f"batchnorm_{sfx}").argtypes = [_PTR] * 8 + [_I64] * 3 + [_DBL, _DBL, _INT]
            getattr(handle, f"batchnorm_backward_{sfx}").argtypes = [_PTR] * 8 + [_I64] * 3 + [_INT]
            getattr(handle, f"bnrelupool_{sfx}").argtypes = [_PTR] * 7 + [_I64] * 10 + [_INT]
            getattr(handle, f"bnrelupool_backward_{sfx}").argtypes = [_PTR] * 10 + [_I64] * 10 + [_INT]
            getattr(handle, f"bnrelupool_{sfx}").restype = _INT
            getattr(handle, f"bnrelupool_backward_{sfx}").restype = _INT
            getattr(handle, f"convbnrelupool_{sfx}").restype = _INT
            getattr(handle, f"convbnrelupool_backward_{sfx}").restype = _INT
            getattr(handle, f"convbnrelupool_{sfx}").argtypes = [_PTR] * 11 + [_I64] * 14 + [_DBL, _DBL, _INT]
            getattr(handle, f"convbnrelupool_backward_{sfx}").argtypes = [_PTR] * 13 + [_I64] * 14 + [_INT]
        return handle
    except (OSError, subprocess.SubprocessError) as err:
        _unavailable("the fast CPU kernels are unavailable (%s)", err)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loaded library stays mapped


def _kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    """The compiled ``name`` for ``dtype`` (float32 or float64)."""
    return getattr(_library(), f"{name}_{_SUFFIX[dtype]}")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ncl(x: Tensor) -> tuple[int, int, int]:
    """Batch, channels and elements per channel plane of an NCHW tensor."""
    n, c = x.shape[:2]
    return n, c, x.numel() // (n * c)


def _threads() -> int:
    return torch.get_num_threads()


# The kernels as operators of the ``mamlkit`` namespace (``torch.ops.mamlkit.*``, see the module docstring for
# what that costs): each is a CPU implementation that allocates the outputs and calls the compiled function;
# the autograd.Functions below call the operators. Optional outputs the caller does not want come back
# empty (numel 0), as an operator returns tensors, not None.
_OPS = torch.library.Library("mamlkit", "DEF")
# name -> (schema, CPU implementation), for benchmarks/kernel_dispatch.py
_IMPLS: dict[str, tuple[str, object]] = {}


def _op(schema: str):
    """Define ``torch.ops.mamlkit.<name>`` by ``schema`` with the decorated function as its CPU kernel."""
    def register(fn):
        name = schema.split("(", 1)[0]
        _IMPLS[name] = schema[len(name):], fn
        _OPS.define(schema)
        _OPS.impl(name, fn, "CPU")
        # not differentiable themselves: the autograd.Functions below differentiate them, so autograd
        # passes through (outputs take no gradient, as tensors a ctypes call wrote)
        _OPS.impl(name, torch.library.fallthrough_kernel, "Autograd")
        return getattr(torch.ops.mamlkit, name)
    return register


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


@_op("max_pool2d(Tensor x, int[2] kernel, int[2] stride) -> (Tensor, Tensor)")
def _max_pool2d_op(x: Tensor, kernel: list[int], stride: list[int]) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    y = x.new_empty((n, c, oh, ow))
    idx = torch.empty((n, c, oh, ow), dtype=torch.int64)
    _kernel("maxpool2d", x.dtype)(
        x.data_ptr(), y.data_ptr(), idx.data_ptr(), n * c, h, w, *kernel, *stride, oh, ow, _threads())
    return y, idx


@_op("batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
     "float momentum, float eps, bool output) -> (Tensor, Tensor, Tensor)")
def _batch_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, momentum: float, eps: float, output: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, invstd)``; ``y`` empty when not ``output`` (statistics and running statistics only)."""
    n, c, hw = _ncl(x)
    mean, invstd = x.new_empty(c), x.new_empty(c)  # small ones first, as torch does (less fragmentation)
    y = torch.empty_like(x) if output else x.new_empty(0)
    _kernel("batchnorm", x.dtype)(
        x.data_ptr(), _ptr(_none_if_empty(y)), _ptr(weight), _ptr(bias), mean.data_ptr(), invstd.data_ptr(),
        _ptr(running_mean), _ptr(running_var), n, c, hw, float(eps), float(momentum), _threads())
    return y, mean, invstd


@_op("batch_norm_backward(Tensor grad, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, bool input_grad) "
     "-> (Tensor, Tensor, Tensor)")
def _batch_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                            input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(d x, d weight, d bias)``, ``d x`` empty when not ``input_grad``."""
    n, c, hw = _ncl(x)
    gw, gb = x.new_empty(c), x.new_empty(c)
    gx = torch.empty_like(x) if input_grad else x.new_empty(0)
    _kernel("batchnorm_backward", x.dtype)(
        grad.data_ptr(), x.data_ptr(), _ptr(weight), mean.data_ptr(), invstd.data_ptr(), _ptr(_none_if_empty(gx)),
        gw.data_ptr(), gb.data_ptr(), n, c, hw, _threads())
    return gx, gw, gb


@_op("batch_norm_relu_max_pool(Tensor y, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, int[2] kernel, "
     "int[2] stride) -> (Tensor, Tensor)")
def _block_op(y: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
              kernel: list[int], stride: list[int]) -> tuple[Tensor, Tensor]:
    """``(out, off)``: the pooled output and each window's argmax as a window-local byte."""
    n, c, h, w = y.shape
    oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    off = torch.empty((n, c, oh, ow), dtype=torch.uint8)  # window-local argmax: 1 byte, not torch's 8
    out = y.new_empty((n, c, oh, ow))
    if _kernel("bnrelupool", y.dtype)(
            y.data_ptr(), _ptr(weight), _ptr(bias), mean.data_ptr(), invstd.data_ptr(), out.data_ptr(),
            off.data_ptr(), n * c, c, h, w, *kernel, *stride, oh, ow, _threads()):
        raise MemoryError("mamlkit.exec.kernels: out of memory in the fused block")
    return out, off


@_op("batch_norm_relu_max_pool_backward(Tensor grad, Tensor y, Tensor out, Tensor off, Tensor? weight, Tensor mean, "
     "Tensor invstd, int[2] kernel, int[2] stride, bool input_grad) -> (Tensor, Tensor, Tensor)")
def _block_backward_op(grad: Tensor, y: Tensor, out: Tensor, off: Tensor, weight: Tensor | None, mean: Tensor,
                       invstd: Tensor, kernel: list[int], stride: list[int], input_grad: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(d y, d weight, d bias)``, ``d y`` empty when not ``input_grad``."""
    n, c, h, w = y.shape
    gw, gb = y.new_empty(c), y.new_empty(c)
    gy = torch.empty_like(y) if input_grad else y.new_empty(0)
    if _kernel("bnrelupool_backward", y.dtype)(
            grad.data_ptr(), y.data_ptr(), out.data_ptr(), off.data_ptr(), _ptr(weight), mean.data_ptr(),
            invstd.data_ptr(), _ptr(_none_if_empty(gy)), gw.data_ptr(), gb.data_ptr(), n, c, h, w, *kernel, *stride,
            out.shape[2], out.shape[3], _threads()):
        raise MemoryError("mamlkit.exec.kernels: out of memory in the fused block's backward")
    return gy, gw, gb


@_op("conv_batch_norm_relu_max_pool(Tensor x, Tensor cw, Tensor? cb, Tensor? weight, Tensor? bias, "
     "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, int[2] padding, int[2] kernel, "
     "int[2] stride) -> (Tensor, Tensor, Tensor, Tensor)")
def _conv_block_op(x: Tensor, cw: Tensor, cb: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                   running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
                   padding: list[int], kernel: list[int], stride: list[int]) -> tuple[Tensor, ...]:
    """``(out, off, mean, invstd)`` of the conv block (``cw`` contiguous)."""
    n, _, h, w = x.shape
    c, kh, kw = cw.shape[0], cw.shape[2], cw.shape[3]
    h1, w1 = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    oh, ow = (h1 - kernel[0]) // stride[0] + 1, (w1 - kernel[1]) // stride[1] + 1
    mean, invstd = x.new_empty(c), x.new_empty(c)
    off = torch.empty((n, c, oh, ow), dtype=torch.uint8)
    out = x.new_empty((n, c, oh, ow))
    if _kernel("convbnrelupool", x.dtype)(
            x.data_ptr(), cw.data_ptr(), _ptr(cb), _ptr(weight), _ptr(bias), mean.data_ptr(), invstd.data_ptr(),
            _ptr(running_mean), _ptr(running_var), out.data_ptr(), off.data_ptr(), n, c, h, w, kh, kw,
            *padding, *kernel, *stride, oh, ow, float(eps), float(momentum), _threads()):
        raise MemoryError("mamlkit.exec.kernels: out of memory in the fused conv block")
    return out, off, mean, invstd


@_op("conv_batch_norm_relu_max_pool_backward(Tensor grad, Tensor x, Tensor cw, Tensor? cb, Tensor out, Tensor off, "
     "Tensor? weight, Tensor mean, Tensor invstd, int[2] padding, int[2] kernel, int[2] stride) "
     "-> (Tensor, Tensor, Tensor, Tensor)")
def _conv_block_backward_op(grad: Tensor, x: Tensor, cw: Tensor, cb: Tensor | None, out: Tensor, off: Tensor,
                            weight: Tensor | None, mean: Tensor, invstd: Tensor, padding: list[int],
                            kernel: list[int], stride: list[int]) -> tuple[Tensor, ...]:
    """``(d cw, d cb, d weight, d bias)``, ``d cb`` empty without ``cb``."""
    n, _, h, w = x.shape
    c = cw.shape[0]
    gcw, gw, gb = torch.empty_like(cw), x.new_empty(c), x.new_empty(c)
    gcb = x.new_empty(c) if cb is not None else x.new_empty(0)
    if _kernel("convbnrelupool_backward", x.dtype)(
            grad.data_ptr(), x.data_ptr(), cw.data_ptr(), _ptr(cb), out.data_ptr(), off.data_ptr(), _ptr(weight),
            mean.data_ptr(), invstd.data_ptr(), gcw.data_ptr(), _ptr(_none_if_empty(gcb)), gw.data_ptr(),
            gb.data_ptr(), n, c, h, w, cw.shape[2], cw.shape[3], *padding, *kernel, *stride, out.shape[2],
            out.shape[3], _threads()):
        raise MemoryError("mamlkit.exec.kernels: out of memory in the fused conv block's backward")
    return gcw, gcb, gw, gb


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int]):
        y, idx = torch.ops.mamlkit.max_pool2d(x, kernel, stride)
        ctx.save_for_backward(x, idx)
        ctx.kernel, ctx.stride = kernel, stride
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_idx: Tensor | None):
        x, idx = ctx.saved_tensors
        # torch's own backward, so its double backward (a gather at idx) is torch's as well
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, list(ctx.kernel), list(ctx.stride),
                                                              [0, 0], [1, 1], False, idx)
        return gx, None, None


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, momentum: float, eps: float):
        y, mean, invstd = torch.ops.mamlkit.batch_norm(x, weight, bias, running_mean, running_var, momentum, eps,
                                                       True)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd  # the statistics, for the fused block below

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mean: Tensor | None, _grad_invstd: Tensor | None):
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph (the inner loop's gradient): torch's own backward, which is differentiable (its
            # double backward is batchnorm_double_backward), on the same saved tensors as torch's layer
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, invstd, True, ctx.eps,
                [need[0], weight is not None and need[1], need[2]])
            return gx, gw, gb, None, None, None, None
        # a first-order backward (the outer one): the same formula, compiled
        gx, gw, gb = torch.ops.mamlkit.batch_norm_backward(grad.contiguous(), x, weight, mean, invstd, need[0])
        return (_none_if_empty(gx), gw if weight is not None and need[1] else None, gb if need[2] else None,
                None, None, None, None)


class _BatchNormReLUMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(y)))`` from batch norm's input ``y`` and the batch statistics its forward
    computed: one pass over ``y`` forward and a sparse one plus a dense one backward, instead of the eight
    passes over ``[N, C, H, W]`` tensors that the three ops make one by one (the first block of Conv4)."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                eps: float, kernel: tuple[int, int], stride: tuple[int, int]):
        out, off = torch.ops.mamlkit.batch_norm_relu_max_pool(y, weight, bias, mean, invstd, kernel, stride)
        ctx.save_for_backward(y, weight, mean, invstd, out, off)
        ctx.eps, ctx.kernel, ctx.stride = eps, kernel, stride
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, weight, mean, invstd, out, off = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], need[2]]
        if torch.is_grad_enabled():
            gy, gw, gb = _block_backward_by_torch(grad, y, weight, mean, invstd, out, off, ctx, mask)
            return gy, gw, gb, None, None, None, None, None
        gy, gw, gb = torch.ops.mamlkit.batch_norm_relu_max_pool_backward(
            grad.contiguous(), y, out, off, weight, mean, invstd, ctx.kernel, ctx.stride, need[0])
        return _none_if_empty(gy), gw if mask[1] else None, gb if need[2] else None, None, None, None, None, None


def batch_norm_relu_max_pool(y: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                             eps: float, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """``max_pool2d(relu(batch_norm(y)))`` in training mode, from ``y`` ``[N, C, H, W]`` (contiguous CPU float)
    and its batch statistics ``mean`` and ``invstd`` ``[C]`` (as constants: the backward differentiates
    through them); returns ``[N, C, OH, OW]``. Derivatives of every order, first-order backward compiled."""
    return _BatchNormReLUMaxPool.apply(y, weight, bias, mean, invstd, eps, kernel, stride)


class _ConvBatchNormReLUMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(conv2d(x))))`` for a one-channel ``x`` (stride 1, zero padding): the
    convolution is recomputed per plane wherever it is needed (9 multiply-adds per element for 3×3), so
    the ``[N, C, H, W]`` conv output is neither stored nor read. Batch statistics and the running-stat
    update as ``F.batch_norm`` in training mode. ``x`` takes no gradient (the caller checks)."""

    @staticmethod
    def forward(ctx, x: Tensor, cw: Tensor, cb: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
                padding: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]):
        cw = cw.contiguous()
        out, off, mean, invstd = torch.ops.mamlkit.conv_batch_norm_relu_max_pool(
            x, cw, cb, weight, bias, running_mean, running_var, momentum, eps, padding, kernel, stride)
        ctx.save_for_backward(x, cw, cb, weight, mean, invstd, out, off)
        ctx.eps, ctx.padding, ctx.kernel, ctx.stride = eps, padding, kernel, stride
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, cw, cb, weight, mean, invstd, out, off = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph: torch's own differentiable ops, on the conv output recomputed by torch
            y = F.conv2d(x, cw, cb, padding=ctx.padding)
            gy, gw, gb = _block_backward_by_torch(grad, y, weight, mean, invstd, out, off, ctx,
                                                  [True, weight is not None and need[3], need[4]])
            _, gcw, gcb = torch.ops.aten.convolution_backward(
                gy, x, cw, None if cb is None else [cw.shape[0]], [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1,
                [False, need[1], cb is not None and need[2]])
            return None, gcw, gcb, gw, gb, None, None, None, None, None, None, None
        gcw, gcb, gw, gb = torch.ops.mamlkit.conv_batch_norm_relu_max_pool_backward(
            grad.contiguous(), x, cw, cb, out, off, weight, mean, invstd, ctx.padding, ctx.kernel, ctx.stride)
        return (None, gcw if need[1] else None, _none_if_empty(gcb) if need[2] else None,
                gw if weight is not None and need[3] else None, gb if need[4] else None,
                None, None, None, None, None, None, None)


def conv_fusable(x: Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether :func:`conv_batch_norm_relu_max_pool` covers ``conv`` on ``x``: one input channel, stride 1,
    zero padding given as numbers, no dilation or groups, a kernel of at most 64 taps, an input that
    takes no gradient, and an output of :data:`MIN_ELEMENTS` or more."""
    w = conv.weight
    if not (type(conv) is torch.nn.Conv2d and conv.in_channels == 1 and conv.groups == 1 and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.kernel_size[0] * conv.kernel_size[1] <= 64 and type(x) is torch.Tensor
            and x.device.type == "cpu" and x.dtype in _SUFFIX and x.dim() == 4 and x.shape[1] == 1
            and x.is_contiguous() and not x.requires_grad and w.dtype == x.dtype and w.device == x.device
            and (conv.bias is None or (conv.bias.dtype == x.dtype and conv.bias.is_contiguous()))
            and _outside_transforms()):
        return False
    shape = conv_output_shape(x, conv)
    return min(shape) > 0 and shape[0] * shape[1] * shape[2] * shape[3] >= MIN_ELEMENTS


def conv_output_shape(x: Tensor, conv: torch.nn.Conv2d) -> tuple[int, int, int, int]:
    """``conv(x)``'s shape for stride 1 and numeric padding."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    return x.shape[0], conv.out_channels, x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1


def conv_batch_norm_relu_max_pool(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, padding: tuple[int, int],
                                  weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                                  running_var: Tensor | None, momentum: float, eps: float, kernel: tuple[int, int],
                                  stride: tuple[int, int]) -> Tensor:
    """``max_pool2d(relu(batch_norm(conv2d(x, conv_weight, conv_bias, padding=padding))))`` in training mode,
    ``x`` ``[N, 1, H, W]`` -> ``[N, C, OH, OW]``, in one compiled kernel (see :func:`conv_fusable`)."""
    return _ConvBatchNormReLUMaxPool.apply(x, conv_weight, conv_bias, weight, bias, running_mean, running_var,
                                           momentum, eps, tuple(padding), kernel, stride)


def batch_stats(y: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> tuple[Tensor, Tensor]:
    """Training-mode batch norm's statistics of ``y`` ``[N, C, H, W]``: ``(mean, invstd)`` ``[C]``, with the
    running statistics updated as ``F.batch_norm`` does (``var`` unbiased there); no output written."""
    _, mean, invstd = torch.ops.mamlkit.batch_norm(y, None, None, running_mean, running_var, momentum, eps, False)
    return mean, invstd


def _block_backward_by_torch(grad: Tensor, y: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                             out: Tensor, off: Tensor, ctx, mask: list[bool]) -> tuple[Tensor, ...]:
    """The fused block's backward under create_graph: torch's own differentiable backwards of max-pool and
    batch norm (``ctx`` holds kernel, stride and eps). Masking the pooled gradient by ``out > 0`` is
    ReLU's backward (threshold_backward on its result), as the gradient reaches only the window maxima,
    where ReLU's result is ``out``. Returns batch norm's ``(d y, d weight, d bias)``."""
    idx = _plane_index(off, ctx.kernel, ctx.stride, y.shape[3])
    gz = torch.ops.aten.max_pool2d_with_indices_backward(
        grad * (out > 0), y, list(ctx.kernel), list(ctx.stride), [0, 0], [1, 1], False, idx)
    return torch.ops.aten.native_batch_norm_backward(gz, y, weight, None, None, mean, invstd, True, ctx.eps, mask)


def _plane_index(off: Tensor, kernel: tuple[int, int], stride: tuple[int, int], width: int) -> Tensor:
    """torch's max-pool indices (row-major within each plane, int64) from window-local offsets."""
    oh, ow = off.shape[2:]
    off = off.long()
    rows = torch.arange(oh).mul_(stride[0]).view(oh, 1) + off // kernel[1]
    cols = torch.arange(ow).mul_(stride[1]) + off % kernel[1]
    return rows * width + cols


def _pair(v, default) -> tuple[int, int] | None:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    return None


# Below this many elements torch's kernels take tens of microseconds, about what the autograd.Function
# around a compiled kernel costs in Python, and under the threads strategy that Python time holds the GIL:
# on Omniglot 5w1s (stride-2 Conv4, [5, 64, 14, 14] activations) routing every batch norm slowed threads
# to 0.75× (docs/performance-notes.md).
MIN_ELEMENTS = 2**18


def _plain(x: object) -> bool:
    """A tensor this module handles: a contiguous 4-d float32/float64 CPU tensor, outside any transform."""
    return (type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu" and x.dtype in _SUFFIX
            and x.dim() == 4 and x.is_contiguous() and x.numel() >= MIN_ELEMENTS)


@dataclasses.dataclass
class _Norm:
    """The last batch norm a mode routed, and relu's result on its output: what a max-pool of that result
    needs to run as one :class:`_BatchNormReLUMaxPool`. Weak references, so no tensor lives longer; the
    versions make sure that nothing was changed in place in between."""

    out: weakref.ref
    out_version: int
    input: weakref.ref
    input_version: int
    weight: Tensor | None
    bias: Tensor | None
    param_versions: tuple[int, ...]
    mean: Tensor
    invstd: Tensor
    eps: float
    relu: weakref.ref | None = None
    relu_version: int = -1

    def fused_input(self, x: Tensor) -> Tensor | None:
        """Batch norm's input, if ``x`` is still relu's unchanged result on this batch norm's output."""
        y = self.input()
        if (self.relu is None or self.relu() is not x or x._version != self.relu_version or y is None
                or y._version != self.input_version or _versions(self.weight, self.bias) != self.param_versions):
            return None
        return y


def _versions(*ts: Tensor | None) -> tuple[int, ...]:
    return tuple(t._version for t in ts if t is not None)


def _max_pool2d(mode, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
    kernel, step = _pair(kernel_size, None), _pair(stride, kernel_size)
    if not (_plain(input) and kernel and step and _pair(padding, 0) == (0, 0) and _pair(dilation, 1) == (1, 1)
            and not ceil_mode and min(*kernel, *step) > 0 and input.shape[2] >= kernel[0]
            and input.shape[3] >= kernel[1]):
        return NotImplemented
    norm = mode.norm
    if not return_indices and norm is not None and kernel[0] * kernel[1] <= 256:
        y = norm.fused_input(input)
        if y is not None:
            return batch_norm_relu_max_pool(y, norm.weight, norm.bias, norm.mean, norm.invstd, norm.eps,
                                            kernel, step)
    y, idx = _MaxPool2d.apply(input, kernel, step)
    return (y, idx) if return_indices else y


def _max_pool2d_with_indices(mode, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                             return_indices=True):
    return _max_pool2d(mode, input, kernel_size, stride, padding, dilation, ceil_mode, True)


def _batch_norm(mode, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    tensors = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    if not (training and _plain(input) and input.shape[0] * input.shape[2] * input.shape[3] > 1
            and isinstance(momentum, (int, float)) and isinstance(eps, (int, float))
            and all(t.dtype == input.dtype and t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous()
                    and t.numel() == input.shape[1] for t in tensors)):
        return NotImplemented
    out, mean, invstd = _BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)
    mode.norm = _Norm(weakref.ref(out), out._version, weakref.ref(input), input._version, weight, bias,
                      _versions(weight, bias), mean, invstd, float(eps))
    return out


def _torch_batch_norm(mode, input, weight, bias, running_mean, running_var, training, momentum, eps, *rest):
    return _batch_norm(mode, input, running_mean, running_var, weight, bias, training, momentum, eps)


_FAST = {
    F.max_pool2d: _max_pool2d,
    F.max_pool2d_with_indices: _max_pool2d_with_indices,
    F.batch_norm: _batch_norm,
    torch.batch_norm: _torch_batch_norm,
}
_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class FastKernels(TorchFunctionMode):
    """Route ``F.max_pool2d`` and ``F.batch_norm`` (training mode) on NCHW CPU tensors to the compiled
    kernels of this module, and a max-pool of a relu of such a batch norm to the fused block; everything
    else runs unchanged. Enter it through :func:`fast`."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0
        self.norm: _Norm | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _FAST.get(func)
        if impl is not None and _outside_transforms():
            out = impl(self, *args, **kwargs)
            if out is not NotImplemented:
                self.hits += 1
                return out
        norm = self.norm
        # relu of the last batch norm's unchanged output (checked before an in-place relu bumps its version)
        after_norm = (func in _RELU and norm is not None and len(args) > 0 and args[0] is norm.out()
                      and args[0]._version == norm.out_version)
        out = func(*args, **kwargs)
        if after_norm and type(out) in (torch.Tensor, torch.nn.Parameter):
            norm.relu, norm.relu_version = weakref.ref(out), out._version
        return out


def _outside_transforms() -> bool:
    return (torch._C._functorch.maybe_current_level() is None and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


# Whether code run under ``fast(key)`` used a kernel the first time. A mode costs a Python call on every
# torch function, which slowed threads on Omniglot 5w1s by 11% where no tensor was large enough
# (docs/performance-notes.md), so code that did not use them runs without the mode after.
_USEFUL: dict[Hashable, bool] = {}


_ACTIVE = threading.local()


def active_mode() -> FastKernels | None:
    """This thread's innermost :func:`fast` mode, if it is routing (for :mod:`mamlkit.exec.kernels.fusion`)."""
    return getattr(_ACTIVE, "mode", None)


@contextlib.contextmanager
def fast(key: Hashable = None) -> Iterator[None]:
    """Run the enclosed per-task code with the fast kernels, when enabled and built (else a no-op).
    The mode is per thread: each worker thread enters its own. ``key`` names the code and its input
    shapes; once a run under a key has used no kernel, later runs under it skip the mode."""
    if not available() or _USEFUL.get(key) is False:
        yield
        return
    mode = FastKernels()
    outer, _ACTIVE.mode = getattr(_ACTIVE, "mode", None), mode
    try:
        with mode:
            yield
    finally:
        _ACTIVE.mode = outer
    if key is not None and key not in _USEFUL:
        _USEFUL[key] = mode.hits > 0
