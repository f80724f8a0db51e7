"""Few-shot intent classification on CLINC150 (Larson et al., EMNLP-IJCNLP 2019).

Data: ``data_full.json`` and ``domains.json`` of the ``clinc/oos-eval`` repository (150 intents in
10 domains, 15 intents each; 100 train / 20 val / 30 test utterances per intent). Both files are
verified by sha256 (:data:`SHA256`); another version is refused unless ``--trust-checksum``. The
folder is ``--data-root`` (the folder itself or ``ROOT/clinc150``), else ``$MAMLKIT_DATA/clinc150``.
Online, :func:`ensure_clinc` (``mamlkit data clinc150``) downloads them from :data:`URL`.

Episodes use the first ``text_per_intent`` (default all 100) of each intent's *train* utterances, in
file order: a class-indexed tensor ``[150, M, ...]`` for :class:`~mamlkit.tasks.episodes.EpisodeSampler`
(the original val/test utterances are not used: the meta-split is by domain, not by utterance).

Meta-split by domain (fixed, :data:`DOMAIN_SPLIT`), so test intents come from domains never seen
in meta-training: 6 train domains (90 intents), 2 val (30), 2 test (30). Within a split, intents are
ordered as in ``domains.json`` (domains in the order of :data:`DOMAIN_SPLIT`).

Encoder modes (``--encoder-mode``), see :mod:`mamlkit.data.encoders`:

* ``frozen``: every utterance's all-MiniLM-L6-v2 embedding ``[384]`` is computed once and cached
  (``$MAMLKIT_CACHE/clinc150/``, safetensors; the file records the data's and the weights' sha256
  and the sha256 of its own values, and a cache that does not match is rebuilt). The model is a small
  MLP over embeddings; with ``--algo anil`` (the presets) only its last layer adapts.
* ``finetune``: the hidden states entering the last ``finetune_layers`` encoder layers are cached
  (float16, ``text_max_tokens`` tokens) and those layers, initialised from the pretrained weights,
  are meta-learned and adapted with the head (``--algo maml``). They come from the full-length pass
  (attention over the whole utterance in the frozen layers) cut to the first ``text_max_tokens``
  tokens; that pass also fills the frozen cache, which the baselines use.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.data import ENV_VAR, DataError, cache_root, dataset_dir, download
from mamlkit.data.caches import read_cache, write_cache
from mamlkit.tasks.episodes import EpisodeSampler
from mamlkit.tasks.family import Baseline, Column, Report

URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/"
SHA256 = {"data_full.json": "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0",
          "domains.json": "b947b579d3b8e74b06f93b01083d8efaff2888b43a3e362533bd88a6e1211b3a"}
DOMAIN_SPLIT = {
    "train": ("auto_and_commute", "credit_cards", "home", "kitchen_and_dining", "small_talk", "utility"),
    "val": ("meta", "work"),
    "test": ("banking", "travel"),
}
PER_INTENT = 100
CACHE_VERSION = 1


@dataclass(frozen=True)
class Clinc:
    """CLINC150's in-scope train utterances: ``texts[intent]`` (100 each, file order), ``domains``
    (domain -> its 15 intents, ``domains.json`` order) and the data file's sha256."""

    texts: dict[str, list[str]]
    domains: dict[str, list[str]]
    sha256: str

    def intents(self, split: str) -> list[str]:
        """The intents of ``split``'s domains (:data:`DOMAIN_SPLIT`), in order."""
        return [i for d in DOMAIN_SPLIT[split] for i in self.domains[d]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_clinc(data_root: str | os.PathLike | None = None, *, download_missing: bool = False) -> Path:
    """The CLINC150 folder; downloads missing files from :data:`URL` when ``download_missing``."""
    folder = dataset_dir("clinc150", data_root, "data_full.json")
    missing = [n for n in SHA256 if not (folder / n).is_file()]
    if missing and download_missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for n in missing:
                download(URL + n, folder / n)
            missing = []
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(f"downloading CLINC150 into {folder} failed ({e})") from None
    if missing:
        raise DataError(f"CLINC150 is not in {folder} (missing {', '.join(missing)}). Download "
                        + " and ".join(URL + n for n in missing) + f" into {folder}/, or point mamlkit at the "
                        f"folder that holds them (or holds clinc150/) with --data-root DIR or {ENV_VAR}=DIR. "
                        "Online, `mamlkit data clinc150` (or `mamlkit data clinc150 --data-root DIR`) does this "
                        "for you.")
    return folder


@lru_cache(maxsize=2)
def load_clinc(data_root: str = "", trust_checksum: bool = False) -> Clinc:
    """Read and verify CLINC150 (see the module docstring). Raises :class:`DataError` when files are
    missing, have an unknown checksum (unless ``trust_checksum``) or do not hold 150 intents × 100."""
    folder = ensure_clinc(data_root)
    digests = {n: _sha256(folder / n) for n in SHA256}
    for n, digest in digests.items():
        if digest != SHA256[n] and not trust_checksum:
            raise DataError(f"{folder / n} has sha256 {digest}, expected {SHA256[n]} (clinc/oos-eval commit "
                            f"828f809). The file may be truncated or another version: download it again from "
                            f"{URL + n}, or pass --trust-checksum if you know it is good.")
    try:
        raw = json.loads((folder / "data_full.json").read_text())
        domains = json.loads((folder / "domains.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse CLINC150 in {folder} ({e}); download it again from {URL}") from None
    texts: dict[str, list[str]] = {}
    for text, intent in raw["train"]:
        texts.setdefault(intent, []).append(text)
    bad = {i: len(t) for i, t in texts.items() if len(t) != PER_INTENT}
    listed = [i for d in domains.values() for i in d]
    if len(texts) != 150 or bad or sorted(listed) != sorted(texts) or sorted(domains) != sorted(
            d for ds in DOMAIN_SPLIT.values() for d in ds):
        raise DataError(f"{folder}/data_full.json does not hold 150 intents × {PER_INTENT} train utterances in "
                        f"the 10 expected domains (intents with other counts: {bad}); download it again from "
                        f"{URL}")
    return Clinc(texts, domains, digests["data_full.json"])


# --------------------------------------------------------------------------------------
# Encoded data, cached once


_MEMORY: dict[Path, Tensor] = {}


def _cache_file(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "clinc150" / f"{kind}-v{CACHE_VERSION}-{digest}.safetensors"


def _load_cache(path: Path, key: dict) -> Tensor | None:
    found = read_cache(path, "values", digest_key="values_sha256",
                       valid=lambda meta, values: json.loads(meta["key"]) == key)
    return None if found is None else found[1]


def encoded(cfg_or_root, *, per_intent: int = PER_INTENT, mode: str = "frozen", layers: int = 1,
            max_tokens: int = 24, trust_checksum: bool = False) -> tuple[Clinc, Tensor]:
    """``(data, values)``: all 150 intents encoded, ``values [150, per_intent, ...]`` in the order of
    ``domains.json`` (``frozen``: embeddings ``[384]`` float32; ``finetune``: hidden states entering the
    last ``layers`` layers with the mask channel, ``[max_tokens, 385]`` float16). Built once, cached
    and verified (module docstring)."""
    from mamlkit.data import encoders

    data = load_clinc(str(cfg_or_root), trust_checksum)
    intents = [i for d in data.domains.values() for i in d]
    key = {"data_sha256": data.sha256, "weights_sha256": encoders.weights_sha256(), "per_intent": per_intent,
           "mode": mode, "intents": intents}
    if mode == "finetune":
        key |= {"layer": encoders.LAYERS - layers, "max_tokens": max_tokens}
    path = _cache_file(mode, key)
    if path in _MEMORY:
        return data, _MEMORY[path]
    values = _load_cache(path, key)
    if values is None:
        texts = [t for i in intents for t in data.texts[i][:per_intent]]

        def shaped(t: Tensor) -> Tensor:
            return t.reshape(len(intents), per_intent, *t.shape[1:]).contiguous()

        if mode == "frozen":
            values = shaped(encoders.encode(texts))
        else:  # the same pass gives the frozen embeddings: cache them too (the baselines use them)
            emb, hidden = encoders.encode(texts, hidden_layer=encoders.LAYERS - layers, pad_to=max_tokens)
            values = shaped(hidden.half())
            frozen_key = {k: key[k] for k in ("data_sha256", "weights_sha256", "per_intent", "intents")}
            frozen_key["mode"] = "frozen"
            _save_cache(_cache_file("frozen", frozen_key), shaped(emb), frozen_key)
        _save_cache(path, values, key)
    _MEMORY.clear()  # one encoding in memory at a time
    _MEMORY[path] = values
    return data, values


def _save_cache(path: Path, values: Tensor, key: dict) -> None:
    try:
        write_cache(path, "values", values, {"format": "mamlkit-clinc150", "key": json.dumps(key)},
                    digest_key="values_sha256")
    except OSError as e:  # a read-only cache folder costs a recomputation next time, nothing else
        import warnings

        warnings.warn(f"could not write the CLINC150 embedding cache {path}: {e}", stacklevel=2)


def split_values(cfg, split: str, mode: str | None = None) -> Tensor:
    """The encoded intents of ``split``: ``[C_split, M, ...]`` (``mode`` overrides ``cfg.encoder_mode``)."""
    if split not in DOMAIN_SPLIT:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    mode = mode or cfg.encoder_mode
    data, values = encoded(cfg.data_root, per_intent=cfg.text_per_intent, mode=mode,
                           layers=cfg.finetune_layers, max_tokens=cfg.text_max_tokens,
                           trust_checksum=cfg.trust_checksum)
    order = [i for d in data.domains.values() for i in d]
    return values[torch.tensor([order.index(i) for i in data.intents(split)])]


def build(cfg, split: str, mode: str | None = None) -> EpisodeSampler:
    """``cfg.n_way``-way ``cfg.k_shot``-shot episodes over ``split``'s intents (``k_query`` per class)."""
    values = split_values(cfg, split, mode)
    try:
        return EpisodeSampler(values, cfg.n_way, cfg.k_shot, cfg.k_query, scale=1.0)  # 1.0: float32 inputs
    except ValueError as e:
        raise UserError(f"CLINC150 {split}: {e}; lower --n-way/--k-shot/--k-query or raise "
                        "--text-per-intent") from None


def model_spec(cfg) -> dict:
    """``frozen``: an MLP over 384-d embeddings (``hidden_sizes``, last layer the head); ``finetune``:
    the pretrained top ``finetune_layers`` MiniLM layers + a linear head."""
    if cfg.encoder_mode == "frozen":
        return {"name": "mlp", "in_features": 384, "hidden": list(cfg.hidden_sizes), "out_features": cfg.n_way}
    spec = {"name": "minilm_head", "layers": cfg.finetune_layers, "out_features": cfg.n_way}
    return spec | ({"rate_scale": cfg.finetune_rate_scale} if cfg.finetune_rate_scale != 1 else {})


def input_spec(cfg) -> dict:
    """Raw inputs are utterances, encoded with the checkpoint's encoder recipe (:mod:`mamlkit.use.inputs`);
    no encoder is loaded here."""
    from mamlkit.data.encoders import LAYERS, PACKAGE

    spec = {"type": "text", "encoder": "all-MiniLM-L6-v2", "package": PACKAGE, "mode": cfg.encoder_mode}
    if cfg.encoder_mode == "finetune":
        spec |= {"hidden_layer": LAYERS - cfg.finetune_layers, "max_tokens": cfg.text_max_tokens}
    return spec


def prepare_data(data_root: str, trust_checksum: bool, download_missing: bool) -> str:
    """``mamlkit data clinc150``: download (when missing and allowed) and verify."""
    folder = ensure_clinc(data_root, download_missing=download_missing)
    ds = load_clinc(str(folder), trust_checksum)
    return (f"clinc150: {folder} verified; {len(ds.texts)} intents in {len(ds.domains)} domains, "
            f"{sum(map(len, ds.texts.values()))} train utterances")


# --------------------------------------------------------------------------------------
# The report: the meta-learner(s) against two baselines on the same test episodes


FRESH_STEPS, FRESH_LR = 100, 0.1  # the fresh-head baseline: full-batch Adam on the support embeddings


def frozen_episodes(cfg, split: str) -> EpisodeSampler:
    """The episodes of ``split`` over the frozen embeddings: the same classes and utterances as
    ``build(cfg, split)`` in either encoder mode (the sampler's draws depend only on the shapes and the seed)."""
    return build(cfg, split, "frozen")


def report(cfg) -> Report:
    """Query accuracy (%) of the meta-learner(s) after 0, 1 and the test-time steps, beside nearest centroid
    on the frozen embeddings and a fresh linear head trained on the support embeddings alone; paired gains."""
    frozen = cfg.encoder_mode == "frozen"
    steps = cfg.eval_inner_steps
    describe = (f"{cfg.preset or 'clinc'}: CLINC150 intents, {cfg.n_way}-way {cfg.k_shot}-shot, {cfg.k_query} "
                f"queries per class, {cfg.eval_tasks} test episodes from the test domains "
                f"({', '.join(DOMAIN_SPLIT['test'])}; never seen in meta-training). Query accuracy (%), "
                "mean ± 95% CI.",
                f"Encoder all-MiniLM-L6-v2, mode {cfg.encoder_mode!r}"
                + (" (embeddings cached)" if frozen else
                   f" (last {cfg.finetune_layers} layer(s) adapted, {cfg.text_max_tokens} tokens)")
                + f"; {cfg.text_per_intent} utterances per intent.")
    baselines = (Baseline("prototypes", "prototypes (nearest centroid, frozen embeddings)", "prototypes",
                          tasks=frozen_episodes),
                 Baseline("fresh_head", "fresh linear head on the support set (frozen embeddings)", "scratch",
                          steps=FRESH_STEPS, lr=FRESH_LR, model=partial(torch.nn.Linear, 384, cfg.n_way),
                          tasks=frozen_episodes))
    # In finetune mode the episodes of hidden states are drawn 20 at a time: all 600 at once take gigabytes.
    return Report(table="methods", describe=describe, metric="accuracy", columns=(Column("acc", "accuracy (%)"),),
                  steps=tuple(sorted({0, 1, steps})), adaptation=f"{{steps}} SGD steps (α={cfg.inner_lr})",
                  baselines=baselines, compare="baselines", facts={"encoder_mode": cfg.encoder_mode},
                  chunk=None if frozen else 20, batch_size=50 if frozen else 10)


__all__ = ["Clinc", "load_clinc", "ensure_clinc", "encoded", "split_values", "build", "model_spec", "input_spec",
           "prepare_data", "report", "DOMAIN_SPLIT", "SHA256"]
