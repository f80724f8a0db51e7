"""Reference models, as plain ``nn.Module``s, and a registry to rebuild them from a spec.

A spec is a JSON-able dict ``{"name": ..., **kwargs}`` stored in every checkpoint, so a
checkpoint can be loaded without pickles: ``build_model(spec)``.
"""

from __future__ import annotations

import math
import re
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mamlkit.base.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


class ModelSpecError(UserError, ValueError):
    """A model spec (from a config or a checkpoint) that names no registered model or does not fit it."""


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build a registered model from ``{"name": ..., **kwargs}``."""
    if not isinstance(spec, dict):
        raise ModelSpecError(f"a model spec is a JSON object, got {type(spec).__name__}")
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ModelSpecError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](**spec)
    except TypeError as e:  # a key the model does not take, or a value of the wrong kind
        raise ModelSpecError(f"model spec {name!r} does not fit the model: {e}") from None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Parameters, their gradients and Adam's two moments: the least a meta-training run holds per parameter.
COPIES_PER_PARAMETER = 4


@dataclass(frozen=True)
class Workload:
    """What a phase of a run holds besides the model, for :func:`check_model_memory`.

    ``example``: one input's shape without the batch dimension (``None``: unknown, activations not counted);
    ``examples``: support + query examples of one task; ``tasks_held``: tasks whose data is in memory at
    once (a meta-batch, the evaluation's fixed tasks); ``tasks_at_once``: tasks adapted together (one for
    the leanest strategy); ``steps``: inner steps whose iterates are kept; ``training``: gradients,
    optimiser moments and the graph through every inner step are kept; ``shrink``: the flags that lower it.
    """

    example: tuple[int, ...] | None
    examples: int
    tasks_held: int = 1
    tasks_at_once: int = 1
    steps: int = 1
    training: bool = False
    shrink: str = "--meta-batch, --eval-tasks, --val-tasks, --k-shot, --k-query, --inner-steps"


def example_shape(spec: dict[str, Any], input_spec: dict[str, Any] | None = None) -> tuple[int, ...] | None:
    """One input's shape: the ``shape`` a checkpoint's input record holds, else an image input spec's size, else
    from a spec of mamlkit's own models; None when none says."""
    shape = input_spec.get("shape") if input_spec else None
    if isinstance(shape, list) and shape and all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                 for s in shape):
        return tuple(shape)
    if input_spec and input_spec.get("type") == "image" and isinstance(input_spec.get("size"), int):
        channels = 1 if input_spec.get("mode") == "L" else 3
        return (channels, input_spec["size"], input_spec["size"])
    name = spec.get("name")
    if name in ("mlp", "tabular_mlp") and isinstance(spec.get("in_features", 1), int):
        return (spec.get("in_features", 1),)
    if name == "conv4" and isinstance(spec.get("image_size", 28), int):
        return (spec.get("in_channels", 1), spec.get("image_size", 28), spec.get("image_size", 28))
    return None


def _activation_bytes(model: nn.Module, example: tuple[int, ...], dtype: torch.dtype) -> int | None:
    """Bytes of every tensor a forward pass of ``model`` (on the ``meta`` device) makes for one example:
    what autograd keeps for a backward through it. None when the forward cannot run shape-only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "is_view", False):  # a view (a weight's transpose) allocates nothing
                return out
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Count.total += t.numel() * t.element_size()
            return out

    try:
        x = torch.zeros((1, *example), dtype=dtype, device="meta")
        with Count():
            model.to(dtype)(x)
    except Exception:  # noqa: BLE001 - a model whose forward needs real data: its activations are not counted
        return None
    return Count.total


def _shape_only(spec: dict[str, Any]) -> nn.Module | None:
    """``spec``'s model built on the ``meta`` device (shapes, no memory), or None when it cannot be built so.
    A user's model (a factory, a Hugging Face folder) is never built here: only what the command approved
    runs its code, once. A ``UserError`` (a spec that does not fit its model) propagates."""
    if not isinstance(spec, dict) or spec.get("name") in USER_MODELS:
        return None
    if spec.get("pretrained"):
        spec = {**spec, "pretrained": False}  # the shapes without reading the pretrained weights
    try:
        with torch.device("meta"):
            return build_model(spec)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a model that cannot be built shape-only (it loads files): not estimated
        return None


def check_model_memory(spec: dict[str, Any], dtype: torch.dtype, *workloads: Workload) -> None:
    """Refuse, before anything is allocated, a model and workloads that cannot fit in the available memory.

    Counted: the parameters (with gradients and optimiser moments when training); for each workload the data
    of ``workload.tasks_held`` tasks; and for ``tasks_at_once`` tasks the activations of a forward pass on
    their examples (measured on the ``meta`` device) and the adapted parameters, once per kept inner step
    and twice (the graph of the inner gradient) when training. A floor, not a peak: what the leanest
    strategy still needs (the executor measures the rest, ``--memory-budget``). The model is built (shape
    only) once for every workload."""
    available = available_memory()
    if available is None:
        return
    model = _shape_only(spec)
    size = torch.finfo(dtype).bits // 8
    n = 0 if model is None else sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    activations: dict[tuple[int, ...] | None, int | None] = {}
    for w in workloads or (None,):
        weights = n * size * (COPIES_PER_PARAMETER if w is None or w.training else 1)
        if weights > available:
            raise ModelSpecError(f"the model {spec.get('name')!r} has {n:,} parameters: about "
                                 f"{weights / 2**30:.1f} GiB with gradients and optimiser state, more than the "
                                 f"{available / 2**30:.1f} GiB of memory available. Use a smaller model "
                                 "(--hidden-sizes, --filters, --image-size).")
        if w is None:
            return
        per_example = math.prod(w.example) * size if w.example is not None else 0
        data = w.tasks_held * w.examples * per_example
        key = None if w.example is None else tuple(w.example)
        if key not in activations:
            activations[key] = (_activation_bytes(model, w.example, dtype)
                                if model is not None and w.example is not None else None)
        act = per_example if activations[key] is None else activations[key]
        kept = w.steps + 1 if w.training else 1  # evaluation's forward passes are not kept from step to step
        per_task = kept * w.examples * act * 2 + (w.steps + 1) * n * size * (2 if w.training else 1)
        need = weights + data + w.tasks_at_once * per_task
        if need > available:
            raise ModelSpecError(
                f"this run needs at least {need / 2**30:.1f} GiB (parameters {weights / 2**30:.1f}, data of "
                f"{w.tasks_held:,} tasks {data / 2**30:.1f}, activations and adapted parameters of "
                f"{w.tasks_at_once:,} task(s) over {w.steps:,} inner steps {w.tasks_at_once * per_task / 2**30:.1f}), "
                f"more than the {available / 2**30:.1f} GiB of memory available. Shrink {w.shrink}, or the model "
                "(--hidden-sizes, --filters, --image-size).")


@register_model("mlp")
def mlp(in_features: int = 1, hidden: list[int] | tuple[int, ...] = (40, 40), out_features: int = 1) -> nn.Module:
    """MLP with ReLU; the paper's sinusoid regressor is ``mlp(1, (40, 40), 1)`` (Finn et al. 2017, §5.1)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


@register_model("conv4")
def conv4(in_channels: int = 1, out_features: int = 5, hidden: int = 64, image_size: int = 28,
          pool: bool = False, bn_track_running_stats: bool = False, global_pool: bool = False) -> nn.Module:
    """Conv4 (Vinyals et al. 2016; Finn et al. 2017, §5.2): 4 × [3×3 conv, BatchNorm, ReLU] + linear head.

    ``pool=False``: stride-2 convolutions, the paper's Omniglot network on 28×28 inputs.
    ``pool=True``: stride-1 convolutions each followed by 2×2 max-pool (the mini-ImageNet
    network, with ``hidden=32`` on 84×84 inputs). BatchNorm uses batch statistics
    (``track_running_stats=False``), as the paper's code does, so it is transductive.
    ``global_pool=True`` averages the last feature map over its positions before the head, as the
    original MAML code does for Omniglot (64 features instead of 64·2·2).
    Input ``[B, C, H, W]``; output ``[B, out_features]``. The head is named ``head``.
    """
    blocks: list[nn.Module] = []
    c, size = in_channels, image_size
    for _ in range(4):
        conv = nn.Conv2d(c, hidden, 3, stride=1 if pool else 2, padding=1)
        block = [conv, nn.BatchNorm2d(hidden, track_running_stats=bn_track_running_stats), nn.ReLU()]
        if pool:
            block.append(nn.MaxPool2d(2))
            size = size // 2
        else:
            size = (size + 1) // 2
        blocks.append(nn.Sequential(*block))
        c = hidden
    if global_pool:
        blocks.append(nn.AdaptiveAvgPool2d(1))
        size = 1
    body = nn.Sequential(*blocks, nn.Flatten())
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(hidden * size * size, out_features)))


class ResidualBlock(nn.Module):
    """ResNet-12's block: 3 × [3×3 conv, BatchNorm] with leaky ReLU (slope 0.1) between, a 1×1 conv + BatchNorm
    shortcut, the sum through leaky ReLU, then 2×2 max-pool. ``[B, c_in, H, W] -> [B, c_out, H/2, W/2]``."""

    def __init__(self, c_in: int, c_out: int, bn_track_running_stats: bool = False):
        super().__init__()
        def bn() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c_out, track_running_stats=bn_track_running_stats)

        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn()
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), bn()
        self.conv3, self.bn3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), bn()
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), bn())
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


@register_model("resnet12")
def resnet12(in_channels: int = 3, out_features: int = 5, hidden: int = 64,
             bn_track_running_stats: bool = False) -> nn.Module:
    """ResNet-12 (Oreshkin et al., TADAM, NeurIPS 2018; Lee et al., MetaOptNet, CVPR 2019): four
    :class:`ResidualBlock` s of widths ``hidden × (1, 2.5, 5, 10)`` (``hidden=64``: the usual 64-160-320-640),
    global average pooling and a linear head named ``head``; no DropBlock. BatchNorm uses batch statistics, as
    in :func:`conv4`. Input ``[B, C, H, W]`` (any H, W >= 16); output ``[B, out_features]``."""
    widths = (hidden, round(2.5 * hidden), 5 * hidden, 10 * hidden)
    blocks, c = [], in_channels
    for w in widths:
        blocks.append(ResidualBlock(c, w, bn_track_running_stats))
        c = w
    body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(c, out_features)))


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed statistics held as buffers, so checkpoints carry them (CSV tasks:
    fitted on meta-train tasks only, see :mod:`mamlkit.tasks.tabular`)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        import torch

        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.std


@register_model("tabular_mlp")
def tabular_mlp(in_features: int, hidden: list[int] | tuple[int, ...] = (40, 40), out_features: int = 1,
                mean: list[float] | None = None, std: list[float] | None = None,
                preprocess: dict[str, Any] | None = None) -> nn.Module:
    """``Standardize`` then the ReLU MLP; input ``[B, in_features]`` (encoded CSV rows), output
    ``[B, out_features]``. ``preprocess`` (JSON: feature names, categories, classes, target statistics)
    is kept as ``model.preprocess`` for whoever maps raw rows and predictions back."""
    std_layer = Standardize(mean or [0.0] * in_features, std or [1.0] * in_features)
    net = mlp(in_features, hidden, out_features)
    model = nn.Sequential(std_layer, *net)
    model.preprocess = dict(preprocess or {})
    return model


@register_model("minilm_head")
def minilm_head(layers: int = 1, out_features: int = 5, pretrained: bool = True,
                rate_scale: float = 1.0) -> nn.Module:
    """The top ``layers`` of all-MiniLM-L6-v2 (pretrained, from the ``text`` extra) + a linear head, over
    cached hidden states ``[B, L, 385]`` (see :mod:`mamlkit.data.encoders`). The head is named ``head``."""
    from mamlkit.data.encoders import minilm_head as build

    return build(layers, out_features, pretrained, rate_scale)


# --------------------------------------------------------------------------------------
# A user's own model: a factory named by import path, or a Hugging Face model


# Specs of models a user brings (checkpoints record them; rebuilding needs their code or files).
USER_MODELS = ("factory", "hf")
# The model every task family was recorded with before ``model`` chose anything: it means the family's own.
_LEGACY_DEFAULT = "mlp"


def resolve_spec(model: str, args: dict[str, Any], family_spec: dict[str, Any]) -> dict[str, Any]:
    """The spec a run builds: ``family_spec`` (the task's own model) unless ``model`` names the user's.

    ``model``: ``""`` or the family's model name: the family's; ``package.module:function``: the user's factory
    called with ``args``; ``hf:NAME`` or an existing folder: a Hugging Face model (a folder written by
    ``save_pretrained``, or a model id in the local cache) wrapped as :class:`HFModel` with the family's number
    of outputs and ``args`` (``pooling``, ``token_features``). A folder is recorded by its absolute path.
    """
    import os

    from mamlkit.base.errors import UserError

    if model in ("", family_spec["name"], _LEGACY_DEFAULT):
        if args:
            raise UserError("--model-args applies to --model package.module:factory or a Hugging Face model")
        return family_spec
    if model in MODELS:
        raise UserError(f"--model {model}: this task builds mamlkit's {family_spec['name']!r}; bring another model "
                        "as --model package.module:factory or a Hugging Face folder")
    if model.startswith("hf:") or os.path.isdir(model):
        path = model.removeprefix("hf:")
        path = os.path.abspath(path) if os.path.isdir(path) else path
        unknown = sorted(set(args) - {"pooling", "token_features", "out_features"})
        if unknown:
            raise UserError(f"--model-args for a Hugging Face model takes pooling, token_features and "
                            f"out_features, not {', '.join(unknown)}")
        return {"name": "hf", "path": path, "out_features": family_spec.get("out_features", 1), "pooling": "first",
                "token_features": 1, **args}
    if ":" in model:
        return factory_spec(model, args)
    raise UserError(f"--model {model!r} is neither a package.module:factory, a Hugging Face folder nor hf:MODEL_ID "
                    f"(mamlkit's own for this task: {family_spec['name']})")


def factory_spec(factory: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec of ``package.module:function(**args)``, a user's ``nn.Module`` factory: JSON, so a checkpoint
    records how to rebuild the model, and rebuilding needs the same package importable."""
    return {"name": "factory", "factory": factory, "args": dict(args or {})}


# A factory is ``package.module:function`` (or ``:Class.method``): dotted identifiers only, bounded.
_FACTORY_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_FACTORY_NAME_MAX = 200
# torch's own callables load files and code (``torch.hub.load``, ``torch.load``, ``torch.jit.load``,
# ``torch.utils.cpp_extension.load``): never a factory. Its ``nn`` modules are plain layers.
_TORCH_FACTORIES = ("torch.nn",)


def check_factory_name(factory: object) -> str:
    """``factory`` if it may name a model factory, checked before anything is imported; else a UserError.

    A factory is a user's ``package.module:function`` that returns an ``nn.Module``. The standard library
    (``os:system``, ``subprocess:run``, ``runpy:run_path``, ``builtins:open``), torch outside ``torch.nn``
    (``torch.hub:load``) and mamlkit itself (its models are named by their registry names) are never
    factories, with or without the user's consent: calling them with a file's arguments runs code or
    touches files, and none of them builds a model."""
    if not isinstance(factory, str) or len(factory) > _FACTORY_NAME_MAX or not _FACTORY_NAME.fullmatch(factory):
        shown = repr(factory)[:80]
        raise ModelSpecError(f"model factory {shown} is not a name of the form package.module:function "
                             f"(identifiers only, at most {_FACTORY_NAME_MAX} characters)")
    module = factory.partition(":")[0]
    top = module.split(".")[0]
    torch_nn = any(module == m or module.startswith(m + ".") for m in _TORCH_FACTORIES)
    if top in sys.stdlib_module_names or top in ("mamlkit", "__main__") or (top == "torch" and not torch_nn):
        raise ModelSpecError(f"model factory {factory!r}: {module!r} is not a model factory's module (the standard "
                             "library, torch outside torch.nn and mamlkit itself are never called to build a "
                             "model). Name your own function that returns an nn.Module: --model package.module:fn")
    return factory


def _import_factory(factory: str) -> Callable[..., nn.Module]:
    import importlib
    import inspect

    module_name, _, attr = check_factory_name(factory).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--model {factory}: cannot import {module_name!r} ({err}). Install the package that "
                        "defines the model, or put its folder on PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"--model {factory}: module {module_name!r} has no {attr!r}")
    model_class = inspect.isclass(fn) and issubclass(fn, nn.Module)
    if not (model_class or inspect.isfunction(fn) or inspect.ismethod(fn)):
        raise UserError(f"--model {factory}: {attr!r} is neither a function nor an nn.Module class")
    return fn


class UntrustedModelCode(UserError):
    """A file asks mamlkit to import and call a model factory that the user did not name or approve."""


def user_factories(specs: list[Any]) -> list[str]:
    """The factory names that rebuilding ``specs`` (model specs, or ``--model`` strings from a stored config)
    would import, each checked by :func:`check_factory_name`; nothing is imported."""
    names = []
    for spec in specs:
        if isinstance(spec, str):  # a stored config's ``model``: a factory is the form with a colon
            name = spec if ":" in spec and not spec.startswith("hf:") else None
        elif isinstance(spec, dict):
            name = spec.get("factory", "") if spec.get("name") == "factory" else None
        else:
            name = None
        if name is not None and check_factory_name(name) not in names:
            names.append(name)
    return names


def named_factory(model: str) -> str | None:
    """``model`` (a config's ``--model``) if it names a user's factory, else None."""
    return model if user_factories([model]) else None


def import_from_here(model: str | None) -> None:
    """Import the module of ``model`` when it names a user's factory (``package.module:fn``, named on this
    command line; a name that can never be a factory is refused first) with the current folder first on
    ``sys.path``, so ``--model mynets:wide`` finds ``mynets.py`` where the command runs, as ``python -m`` would;
    the ``mamlkit`` script alone does not look there. The folder is on the path only while that module
    imports: nothing else mamlkit imports later can come from it. A module that still cannot be imported is
    left to the factory's own import, whose error names it."""
    import importlib
    import os

    factory = named_factory(model) if model else None
    if factory is None:
        return
    module = factory.partition(":")[0]
    if module in sys.modules:
        return
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        importlib.import_module(module)
    except ImportError:
        pass
    finally:
        if sys.path and sys.path[0] == here:
            del sys.path[0]
        elif here in sys.path:  # the module itself put something before it
            sys.path.remove(here)


def approve_model_code(specs: list[Any], source: str, *, model: str | None = None,
                       trust_model_code: bool = False) -> None:
    """Decide, before anything is imported, whether the model code ``specs`` name may run.

    A checkpoint, an adapted-model file or a stored config records the factory that rebuilds a user's model.
    mamlkit never imports code because a file names it: the user names the factory again (``model``, the
    CLI's ``--model package.module:fn``) or allows the file's code (``trust_model_code``, the CLI's
    ``--trust-model-code``), in which case what will be imported is printed. Otherwise an
    :class:`UntrustedModelCode` names the factory and both ways to proceed. Factories that can never be one
    (:func:`check_factory_name`) are refused either way.
    """
    names = user_factories(specs)
    if model is not None:
        check_factory_name(model)
        if not names:
            raise UserError(f"--model {model}: {source} holds a model of mamlkit's own, not one built by a factory; "
                            "drop --model")
    if not names:
        return
    if trust_model_code:
        print(f"mamlkit: {source} rebuilds its model with code it names; importing {', '.join(names)} "
              "(--trust-model-code)", file=sys.stderr)
        return
    if model is not None and names == [model]:
        return
    asked = " and ".join(repr(n) for n in names)
    given = f" (you named {model!r})" if model is not None else ""
    raise UntrustedModelCode(
        f"{source} rebuilds its model by importing and calling {asked}{given}. mamlkit runs no code that a file "
        f"names. If you trust that code, name it: --model {names[0]} (Python: model={names[0]!r}), or allow the "
        "file's code: --trust-model-code (Python: trust_model_code=True)")


@register_model("factory")
def factory(factory: str, args: dict[str, Any] | None = None) -> nn.Module:
    """``package.module:function(**args)``: it must return an ``nn.Module`` that maps a batch of the task's
    inputs ``[B, *x_shape]`` to predictions (``[B, 1]`` for sinusoid, logits ``[B, n_way]`` for
    classification). Its parameter names are what ``--adapt`` patterns match."""
    from mamlkit.base.errors import UserError

    try:
        model = _import_factory(factory)(**(args or {}))
    except TypeError as err:
        raise UserError(f"--model {factory} with --model-args {args or {}}: {err}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {factory} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


class HFModel(nn.Module):
    """A Hugging Face transformer (encoder or decoder) as a task model: inputs → ``backbone`` → one pooled
    hidden state → ``head`` (linear).

    Inputs: integer token ids ``[B, L]`` go in as ``input_ids``; floating-point features go in as
    ``inputs_embeds`` through a linear ``embed`` layer (``token_features`` → hidden size): ``[B, L,
    token_features]``, or ``[B, F]`` read as ``F`` tokens of one feature each (``token_features=1``).
    ``pooling``: ``"first"`` (BERT's [CLS] position), ``"last"`` (GPT-2's last token) or ``"mean"``.
    Output ``[B, out_features]``. Parameter names: ``backbone.*`` (the Hugging Face model's own names),
    ``embed.*``, ``head.*``: ``--adapt 'head.*'`` is ANIL on the pretrained backbone.
    """

    POOLING = ("first", "last", "mean")

    def __init__(self, backbone: nn.Module, out_features: int, pooling: str = "first", token_features: int = 0):
        super().__init__()
        if pooling not in self.POOLING:
            raise ValueError(f"pooling must be one of {', '.join(self.POOLING)}, got {pooling!r}")
        hidden = backbone.config.hidden_size
        self.backbone, self.pooling = backbone, pooling
        self.embed = nn.Linear(token_features, hidden) if token_features else None
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x):
        if x.is_floating_point():
            if self.embed is None:
                raise ValueError("this model takes token ids; build it with token_features > 0 for features")
            tokens = x.unsqueeze(-1) if x.dim() == 2 else x
            hidden = self.backbone(inputs_embeds=self.embed(tokens)).last_hidden_state
        else:
            hidden = self.backbone(input_ids=x).last_hidden_state
        if self.pooling == "mean":
            return self.head(hidden.mean(1))
        return self.head(hidden[:, 0] if self.pooling == "first" else hidden[:, -1])


def hf_classifier(backbone: nn.Module, out_features: int, pooling: str = "first", token_features: int = 0) -> HFModel:
    """:class:`HFModel` around an already built ``transformers`` model (e.g. one built from a config)."""
    return HFModel(backbone, out_features, pooling, token_features)


@register_model("hf")
def hf(path: str, out_features: int, pooling: str = "first", token_features: int = 0) -> nn.Module:
    """A Hugging Face model from a local folder or the local cache (``local_files_only=True``: nothing is
    downloaded), wrapped as :class:`HFModel`. Needs the ``text`` extra (``transformers``)."""
    from mamlkit.base.errors import UserError

    try:
        import transformers
    except ImportError:
        raise UserError(f"--model {path}: Hugging Face models need transformers: pip install 'mamlkit[text]'"
                        ) from None
    import os

    transformers.utils.logging.disable_progress_bar()  # a bar per load would fill the run's log
    try:
        folder = path
        if not os.path.isdir(path):  # a model id: its snapshot in the local cache, found without asking the hub
            from huggingface_hub import snapshot_download

            folder = snapshot_download(path, local_files_only=True)
        backbone = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - the hub's and transformers' errors for a missing model vary
        raise UserError(f"--model {path}: no Hugging Face model there or in the local cache "
                        f"({str(err).splitlines()[0]}). Give a folder written by save_pretrained, or download "
                        "the model first") from None
    return HFModel(backbone, out_features, pooling, token_features)
