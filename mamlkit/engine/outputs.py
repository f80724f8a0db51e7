"""Which tensor of a model's output the loss takes.

A model may return a tensor, a tuple, a dict or a Hugging Face ``ModelOutput`` (what every
``AutoModelFor...`` returns). The loss, the accuracy and the predictions are computed on one tensor of
it, chosen by an ``output`` selector:

* ``None`` (the default): a tensor as it is; a ``ModelOutput`` or dict that holds ``logits``, its logits;
  a one-element tuple or list, its element. Anything else (a tuple of several tensors, a dict without
  ``logits``) is refused with an error that lists what the model returned: picking the first of several
  tensors in silence could train on the wrong one;
* a string: that key of a dict or ``ModelOutput``, or that attribute (``"logits"``);
* an integer: that position of a tuple or list, or of a ``ModelOutput``'s fields (``0``);
* a callable ``output(raw) -> Tensor`` for anything else (``lambda out: out.logits[:, :1]``).

The selector runs inside the per-task function, on each call of the model, so whatever runs the tasks
(vmap, a loop, threads, a compiled graph) only ever sees tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from mamlkit.base.errors import UserError

OutputSpec = None | str | int | Callable[[Any], Tensor]
# how much of a model's output an error message describes (a ModelOutput of 30 hidden states stays one line)
_SHOWN_ITEMS = 6


class OutputError(UserError, TypeError):
    """The selector does not fit what the model returns; the message says what it returned and how to choose."""


def describe(out: Any) -> str:
    """One bounded line naming a model's output: its type, and its fields or items with their shapes."""
    def one(v: Any) -> str:
        return f"Tensor {list(v.shape)}" if isinstance(v, Tensor) else type(v).__name__

    name = type(out).__name__
    if isinstance(out, Tensor):
        return f"a Tensor {list(out.shape)}"
    if isinstance(out, Mapping):
        items = [f"{k!r}: {one(v)}" for k, v in list(out.items())[:_SHOWN_ITEMS]]
        more = ", ..." if len(out) > _SHOWN_ITEMS else ""
        return f"a {name} {{{', '.join(items)}{more}}}"
    if isinstance(out, (tuple, list)):
        items = [one(v) for v in list(out)[:_SHOWN_ITEMS]]
        more = ", ..." if len(out) > _SHOWN_ITEMS else ""
        return f"a {name} of {len(out)} ({', '.join(items)}{more})"
    return f"a {name}"


class OutputSelector:
    """``selector(raw_output) -> Tensor`` for an ``output`` spec (see the module docstring); ``spec`` keeps
    what was asked, which checkpoints record (a key or an index; a callable is not recorded)."""

    def __init__(self, spec: OutputSpec = None):
        if isinstance(spec, OutputSelector):
            spec = spec.spec
        ok = spec is None or callable(spec) or (isinstance(spec, str) and spec != "") \
            or (isinstance(spec, int) and not isinstance(spec, bool))
        if not ok:
            raise OutputError(f"output must be None, a key or attribute name (\"logits\"), an index (0) or a "
                              f"function of the model's output; got {spec!r}")
        self.spec = spec

    def __call__(self, out: Any) -> Tensor:
        spec = self.spec
        if spec is None:
            picked = _default(out)
        elif isinstance(spec, str):
            picked = _by_key(out, spec)
        elif isinstance(spec, int):
            picked = _by_index(out, spec)
        else:
            picked = spec(out)
        if not isinstance(picked, Tensor):
            raise OutputError(f"output={self.shown} selects {describe(picked)} from the model's output, not a "
                              f"tensor; the model returns {describe(out)}. {_HOW}")
        return picked

    @property
    def shown(self) -> str:
        """The spec as a user wrote it (a function by its name)."""
        spec = self.spec
        return getattr(spec, "__name__", "a function") if callable(spec) else repr(spec)

    @property
    def recordable(self) -> bool:
        """Whether a file can hold the spec (JSON: a key or an index; never code)."""
        return not callable(self.spec)

    def __repr__(self) -> str:
        return f"OutputSelector({self.shown})"


_HOW = ("Choose the tensor the loss takes with output= (Python) or --output (CLI): a key or attribute such as "
        "logits, an index such as 0, or (Python) a function of the output")


def _default(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and len(out) == 1:
        return out[0]
    raise OutputError(f"the model returns {describe(out)}, not a tensor, and nothing in it is unambiguously "
                      f"the prediction (a ModelOutput or dict with 'logits', or a one-element tuple). {_HOW}")


def _by_key(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        if key in out:
            return out[key]
        raise OutputError(f"output={key!r}: the model returns {describe(out)}, which has no {key!r}. {_HOW}")
    if isinstance(out, Tensor) or not hasattr(out, key):
        raise OutputError(f"output={key!r} names a key or attribute, but the model returns {describe(out)}"
                          f"{' (drop output to use it as it is)' if isinstance(out, Tensor) else ''}. {_HOW}")
    return getattr(out, key)


def _by_index(out: Any, index: int) -> Any:
    if isinstance(out, Mapping) and hasattr(out, "to_tuple"):  # a ModelOutput indexes its fields that are set
        out_items = out.to_tuple()
    elif isinstance(out, (tuple, list)):
        out_items = out
    else:
        raise OutputError(f"output={index} is an index, but the model returns {describe(out)}, which is not a "
                          f"tuple or list. {_HOW}")
    if not -len(out_items) <= index < len(out_items):
        raise OutputError(f"output={index}: the model returns {describe(out)}, with {len(out_items)} "
                          f"item(s). {_HOW}")
    return out_items[index]


def output_selector(spec: OutputSpec | OutputSelector = None) -> OutputSelector:
    """The selector for ``spec`` (an :class:`OutputSelector` is returned as it is)."""
    return spec if isinstance(spec, OutputSelector) else OutputSelector(spec)


__all__ = ["OutputError", "OutputSelector", "OutputSpec", "describe", "output_selector"]
