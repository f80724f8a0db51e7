"""Reference models, as plain ``nn.Module``s, and a registry to rebuild them from a spec.

A spec is a JSON-able dict ``{"name": ..., **kwargs}`` stored in every checkpoint, so a
checkpoint can be loaded without pickles: ``build_model(spec)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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


def check_model_memory(spec: dict[str, Any], dtype: torch.dtype) -> None:
    """Refuse a model whose parameters alone (with gradients and optimiser moments) exceed the available
    memory, before anything is allocated: the model is first built on the ``meta`` device (shapes only)."""
    available = available_memory()
    if available is None:
        return
    if spec.get("pretrained"):
        spec = {**spec, "pretrained": False}  # the shapes without reading the pretrained weights
    try:
        with torch.device("meta"):
            model = build_model(spec)
    except Exception:  # a model that cannot be built shape-only (it loads files): nothing to estimate
        return
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    need = n * torch.finfo(dtype).bits // 8 * COPIES_PER_PARAMETER
    if need > available:
        raise ModelSpecError(f"the model {spec.get('name')!r} has {n:,} parameters: about {need / 2**30:.1f} GiB "
                             f"with gradients and optimiser state, more than the {available / 2**30:.1f} GiB of "
                             "memory available. Use a smaller model (--hidden-sizes, --filters, --image-size).")


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
