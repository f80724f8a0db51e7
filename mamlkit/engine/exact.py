"""Exact meta-gradients for any model: attention, recurrent layers and normalisation, under every strategy.

MAML's meta-gradient differentiates the inner loop's gradient again. Three families of torch's
fused kernels break that, each in its own way, and this module reroutes each to a form whose
derivatives of every order are exact, so that a user's model runs unchanged:

* **Attention.** ``F.scaled_dot_product_attention`` picks a fused kernel (flash attention on the CPU
  and on CUDA, memory-efficient attention on CUDA) whose backward has no derivative of its own:
  the second backward raises ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
  is not implemented``. The math kernel (softmax(QKᵀ/√d)V as primitive ops) is exact at every order.
  :func:`exact_ops` selects it with :func:`torch.nn.attention.sdpa_kernel` whenever the graph will be
  differentiated twice, and under ``torch.vmap`` (where the fused kernels have no batching rule and
  fall back to a per-example loop). That covers every caller of the function, also those inside
  other torch functions: ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` /
  ``DecoderLayer`` and Hugging Face's ``sdpa`` attention. First-order meta-gradients and
  evaluation in the per-task loop keep the fused kernels, which are exact there (one backward).
* **Recurrent layers.** ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` call one fused ``_VF`` kernel whose
  vmap batching rule assumes unbatched weights; with per-task (batched) weights it fails (``output with
  shape [5, 48] doesn't match the broadcast shape [3, 5, 48]``). Under vmap, :class:`ExactOps` runs
  them as their cell equations (Hochreiter & Schmidhuber 1997; Cho et al. 2014) in linear, sigmoid and
  tanh, which batch exactly. The loop keeps the fused kernel (exact there, and faster).
* **Normalisation** (:class:`~mamlkit.engine.functional.ExactNorms`): vmap's fused batch, instance and
  layer norm give second-order meta-gradients off by ~1e-2; the same mode reroutes them.
* **Embeddings with a padding index**: under vmap, the gradient reaches the padding row, which torch holds
  constant; the same mode gathers rows and holds the padding positions constant.

A :class:`TorchFunctionMode` sees only the torch functions a model calls directly, not those called
inside another torch function, which is why attention goes through the kernel switch (MultiheadAttention
calls it inside ``F.multi_head_attention_forward``), while the recurrent and norm kernels, which
modules call directly, go through the mode.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mamlkit.base.errors import UserError
from mamlkit.engine.functional import _EXACT as _EXACT_NORMS

log = logging.getLogger("mamlkit")


class ExactOpsError(UserError, RuntimeError):
    """A model part that no exact rerouting covers under the current strategy; the message names a
    strategy that runs it (the CLI prints it and exits with code 2)."""


# --------------------------------------------------------------------------------------
# Recurrent layers as their cell equations


def _lstm_cell(x_t: Tensor, state: tuple[Tensor, Tensor], w_hh: Tensor, b_hh: Tensor | None,
               w_hr: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    h, c = state
    i, f, g, o = (x_t + F.linear(h, w_hh, b_hh)).chunk(4, -1)  # torch's gate order: input, forget, cell, output
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:  # LSTM with projections (proj_size > 0)
        h = F.linear(h, w_hr)
    return h, (h, c)


def _gru_cell(x_t: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, _w_hr: None) -> tuple[Tensor, Tensor]:
    xr, xz, xn = x_t.chunk(3, -1)  # torch's gate order: reset, update, new
    hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h = (1 - z) * n + z * h
    return h, h


def _simple_cell(nonlinearity):
    def cell(x_t: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, _w_hr: None) -> tuple[Tensor, Tensor]:
        h = nonlinearity(x_t + F.linear(h, w_hh, b_hh))
        return h, h
    return cell


_CELLS = {"lstm": _lstm_cell, "gru": _gru_cell, "rnn_tanh": _simple_cell(torch.tanh),
          "rnn_relu": _simple_cell(torch.relu)}
_MODULE_OF = {"lstm": "nn.LSTM", "gru": "nn.GRU", "rnn_tanh": "nn.RNN", "rnn_relu": "nn.RNN"}


def recurrent(kind: str, input: Tensor, hx: Tensor | Sequence[Tensor], params: Sequence[Tensor], has_biases: bool,
              num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool
              ) -> tuple[Tensor, ...]:
    """``torch.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` (the padded-input overload) in primitive ops.

    ``input [B, T, I]`` (``batch_first``) or ``[T, B, I]``; ``hx [L·D, B, H]`` (a pair ``(h, c)`` for the
    LSTM); ``params``: the module's ``_flat_weights`` (per layer and direction: ``w_ih, w_hh[, b_ih, b_hh][,
    w_hr]``). Returns ``(output, h_n)`` or, for the LSTM, ``(output, h_n, c_n)``, as the fused kernel.
    """
    cell = _CELLS[kind]
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    proj = kind == "lstm" and per == (4 if has_biases else 2) + 1
    x = input.transpose(0, 1) if batch_first else input  # [T, B, I]
    steps = x.shape[0]
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w = params[idx * per:(idx + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if proj else None
            state = (hx[0][idx], hx[1][idx]) if kind == "lstm" else hx[idx]
            x_proj = F.linear(x, w_ih, b_ih)  # the input part of every step at once: [T, B, G·H]
            ys: list[Tensor] = [x_proj[0]] * steps
            for t in (reversed(range(steps)) if d else range(steps)):
                ys[t], state = cell(x_proj[t], state, w_hh, b_hh, w_hr)
            outs.append(torch.stack(ys))
            if kind == "lstm":
                h_n.append(state[0])
                c_n.append(state[1])
            else:
                h_n.append(state)
        x = torch.cat(outs, -1) if dirs > 1 else outs[0]
        if dropout and train and layer < num_layers - 1:  # torch applies it between layers, not after the last
            x = F.dropout(x, dropout, training=True)
    out = x.transpose(0, 1) if batch_first else x
    return (out, torch.stack(h_n), torch.stack(c_n)) if kind == "lstm" else (out, torch.stack(h_n))


def _packed_message(what: str) -> str:
    return (f"{what} with a PackedSequence input cannot run per-task weights under torch.vmap (strategies vmap "
            "and compile): its fused kernel has no batching rule for them. Use --strategy loop or threads "
            "(strategy='loop' in Python), or pass padded sequences")


def _refuse_packed(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook under vmap: name the recurrent layer that got a PackedSequence (its forward would
    otherwise fail on a data-dependent ``.item()`` with a message that names no layer)."""
    if isinstance(module, nn.RNNBase) and args and isinstance(args[0], nn.utils.rnn.PackedSequence):
        raise ExactOpsError(_packed_message(f"nn.{type(module).__name__} ({module})"))


def _recurrent_impl(kind: str):
    def impl(*args, **kwargs):
        # The packed-sequence overload takes ``batch_sizes`` where the padded one takes ``hx`` (LSTM) or
        # ``params`` (the others).
        if kwargs or isinstance(args[1] if kind == "lstm" else args[2], Tensor):
            raise ExactOpsError(_packed_message(_MODULE_OF[kind]))
        return recurrent(kind, *args)
    return impl


_EXACT_RECURRENT = {getattr(torch, kind): _recurrent_impl(kind) for kind in _CELLS}


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
               sparse=False):
    # Under vmap the embedding's backward lets gradient into the padding row, which torch's semantics hold
    # constant (BERT's [PAD] vector: 2e-2 relative error in the meta-gradient). Gather the rows, and make the
    # padding positions constants: the same values, no gradient at any order.
    if padding_idx is None or max_norm is not None or scale_grad_by_freq:
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    if padding_idx < 0:
        padding_idx += weight.shape[0]
    out = weight[input]
    return torch.where((input == padding_idx).unsqueeze(-1), out.detach(), out)


_EXACT_VMAP = {**_EXACT_NORMS, **_EXACT_RECURRENT, F.embedding: _embedding}


class ExactOps(TorchFunctionMode):
    """Under ``torch.vmap``: fused normalisation and recurrent kernels rerouted to exact compositions of
    primitive ops (see the module docstring). Attention is switched by :func:`exact_ops`, not here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = _EXACT_VMAP.get(func)
        return (impl or func)(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------
# Attention: the math kernel whenever a graph is differentiated twice

_ATTENTION_LOGGED = False
_NOTED: weakref.WeakSet = weakref.WeakSet()  # models whose modules note_model has looked at


def _has_attention(model: nn.Module) -> list[str]:
    """Class names of the attention layers in ``model`` (torch's and any ``*Attention`` module), for the log."""
    names = {type(m).__name__ for m in model.modules()
             if isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith(("Attention", "SelfAttention"))}
    return sorted(names)


def note_model(model: nn.Module) -> None:
    """Say once per process that attention in ``model`` runs through the math kernel for exact second order."""
    global _ATTENTION_LOGGED
    if _ATTENTION_LOGGED or model in _NOTED:  # asked on every per-task build: scan each model's modules once
        return
    _NOTED.add(model)
    layers = _has_attention(model)
    if layers:
        _ATTENTION_LOGGED = True
        log.info("mamlkit: attention (%s) runs through torch's math kernel where the meta-gradient differentiates "
                 "it twice or tasks are vmapped: the fused kernels have no double backward", ", ".join(layers))


def math_attention() -> contextlib.AbstractContextManager:
    """``F.scaled_dot_product_attention`` runs torch's math kernel within the block (process-wide: a kernel
    switch, not a mode, so that it reaches the calls inside other torch functions). Enter it outside
    ``torch.compile``-d code: the compiled graph keeps the kernel chosen when it was traced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def exact_ops(*, vectorized: bool, second_order: bool = True) -> Iterator[None]:
    """Run per-task work so that its meta-gradient is exact (module docstring).

    ``vectorized``: the tasks run under ``torch.vmap`` (also compiled): norms and recurrent layers are
    rerouted to primitive ops, and attention uses the math kernel. ``second_order``: the graph will be
    differentiated twice (second-order meta-gradients): attention uses the math kernel. With neither
    (first-order or evaluation in a loop), nothing changes and the fused kernels run.
    """
    with contextlib.ExitStack() as stack:
        if vectorized or (second_order and torch.is_grad_enabled()):
            stack.enter_context(math_attention())
        if vectorized:
            stack.enter_context(ExactOps())
            stack.callback(nn.modules.module.register_module_forward_pre_hook(_refuse_packed).remove)
        yield


__all__ = ["ExactOps", "ExactOpsError", "exact_ops", "math_attention", "note_model", "recurrent"]
