"""Omniglot N-way K-shot classification (Lake et al. 2015; Finn et al. 2017, §5.2).

Splits (``TrainConfig.split``), by character; a character's 20 drawings stay together:

* ``"paper"`` (default): the MAML paper's split of all 1623 characters into 1200 for meta-training
  and 423 for testing, with 100 of the 1200 held out for validation as the original code does
  (1100 train / 100 val / 423 test). Exact procedure: every character gets the key
  ``blake2b("omniglot-split/1/" + name)`` (8-byte digest, read little-endian), where ``name`` is
  ``"images_background/<Alphabet>/characterNN"`` (or ``images_evaluation/...``) and ``1`` is the fixed
  split seed :data:`SPLIT_SEED`. Characters sorted by key: ranks 0-1099 are ``train``, 1100-1199
  ``val``, 1200-1622 ``test``. The order depends on nothing but the names (not on the file system,
  the torch version or the run's seed), so every run and machine gets the same split. It is not
  the original code's exact list, which came from ``os.listdir`` order and Python's ``random``.
* ``"background"``: Lake et al.'s official background/evaluation split: ``test`` is the 659
  evaluation characters; the 964 background characters are split by the same key into 864
  ``train`` and 100 ``val``. (This is the official split, not Vinyals et al.'s own character lists,
  which mamlkit does not ship.)

Rotations (``TrainConfig.rotations``) by 0°, 90°, 180° or 270° make new classes (Santoro et al.
2016; Finn et al. 2017), in every split:

* ``"per_task"`` (default, as the original MAML code): each class of each task gets one rotation,
  drawn uniformly, shared by all its drawings in that task. Classes of a task are distinct
  characters.
* ``"expand"``: the class set is expanded 4×: each (character, rotation) is a class of its own
  (Vinyals et al. 2016), so a task may hold two rotations of one character as different classes.
* ``"none"``: no rotations.

Both rotation modes have 4× as many classes as characters; they differ only in whether two
rotations of one character may meet in a task.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.data import Omniglot, cache_root, ensure_omniglot, load_omniglot, resolve_root
from mamlkit.tasks.episodes import gather, sample_classes, sample_examples
from mamlkit.tasks.family import Report

SPLIT_SEED = 1
SPLITS = ("paper", "background")
ROTATIONS = ("per_task", "expand", "none")
PAPER_SIZES = {"train": 1100, "val": 100, "test": 423}
BACKGROUND_VAL = 100


def _split_key(name: str) -> int:
    digest = hashlib.blake2b(f"omniglot-split/{SPLIT_SEED}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_indices(names: tuple[str, ...] | list[str], split: str = "paper") -> dict[str, Tensor]:
    """Character indices ``{"train", "val", "test"} -> LongTensor`` for the split scheme ``split``
    (see the module docstring for the exact procedure). Indices are sorted ascending."""
    if split == "paper":
        order = sorted(range(len(names)), key=lambda i: _split_key(names[i]))
        a, b = PAPER_SIZES["train"], PAPER_SIZES["train"] + PAPER_SIZES["val"]
        parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    elif split == "background":
        bg = sorted((i for i, n in enumerate(names) if n.startswith("images_background/")),
                    key=lambda i: _split_key(names[i]))
        parts = {"train": bg[:-BACKGROUND_VAL], "val": bg[-BACKGROUND_VAL:],
                 "test": [i for i, n in enumerate(names) if n.startswith("images_evaluation/")]}
    else:
        raise UserError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLITS)}")
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in parts.items()}


def rotated(images: Tensor) -> Tensor:
    """``[C, M, H, W] -> [4·C, M, 1, H, W]``: class ``r·C + c`` is class ``c`` rotated by ``r·90°``."""
    rots = torch.stack([torch.rot90(images, r, dims=(-2, -1)) for r in range(4)])
    return rots.reshape(4 * images.shape[0], *images.shape[1:-2], 1, *images.shape[-2:])


@dataclass(frozen=True, eq=False)
class OmniglotTasks:
    """N-way K-shot Omniglot tasks over one split's characters ``images [C, 20, H, W]`` (uint8).

    ``sample(T, g)``: support ``x [T, N·K, 1, H, W]`` float32 in [0, 1] (strokes 1), ``y [T, N·K]``;
    query ``[T, N·Q, ...]``. See the module docstring for ``rotations``.
    """

    images: Tensor
    n_way: int
    k_shot: int
    k_query: int
    rotations: str = "per_task"
    kind: str = "classification"

    def __post_init__(self) -> None:
        if self.rotations not in ROTATIONS:
            raise UserError(f"unknown rotations mode {self.rotations!r}; choose one of "
                            f"{', '.join(ROTATIONS)}")
        C, M = self.images.shape[:2]
        classes = C * (4 if self.rotations == "expand" else 1)
        if self.n_way > classes:
            raise UserError(f"{self.n_way}-way tasks need {self.n_way} classes; this split has {classes}")
        if self.k_shot + self.k_query > M:
            raise UserError(f"k_shot + k_query = {self.k_shot + self.k_query} exceeds the {M} drawings per "
                            "Omniglot character")
        data = rotated(self.images) if self.rotations != "none" else self.images[:, :, None]
        object.__setattr__(self, "data", data)

    @property
    def num_characters(self) -> int:
        return self.images.shape[0]

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(classes [T, N], examples [T, N, K+Q])``, classes indexing ``self.data``."""
        C = self.num_characters
        if self.rotations == "expand":
            classes = sample_classes(4 * C, num_tasks, self.n_way, generator)
        else:
            classes = sample_classes(C, num_tasks, self.n_way, generator)
            if self.rotations == "per_task":
                classes = classes + C * torch.randint(0, 4, classes.shape, generator=generator)
        examples = sample_examples(self.images.shape[1], (num_tasks, self.n_way), self.k_shot + self.k_query,
                                   generator)
        return classes, examples

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        classes, examples = self.sample_indices(num_tasks, generator)
        return gather(self.data, classes, examples, self.k_shot, 1 / 255)


@lru_cache(maxsize=4)
def _dataset(root: str, trust_checksum: bool, image_size: int) -> Omniglot:
    return load_omniglot(root, trust_checksum=trust_checksum, size=image_size)


def omniglot_split(cfg, split: str) -> Tensor:
    """The characters ``[C, 20, H, W]`` (uint8) of ``split`` (train | val | test) under ``cfg.split``."""
    data = _dataset(str(resolve_root(cfg.data_root)), cfg.trust_checksum, cfg.image_size)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    return data.images[split_indices(data.names, cfg.split)[split]]


def build(cfg, split: str) -> OmniglotTasks:
    """The task family's builder: ``cfg.n_way``-way ``cfg.k_shot``-shot tasks on ``split``."""
    if cfg.loss != "cross_entropy":
        raise UserError(f"Omniglot is classification: use --loss cross_entropy (got {cfg.loss!r})")
    return OmniglotTasks(omniglot_split(cfg, split), cfg.n_way, cfg.k_shot, cfg.k_query, cfg.rotations)


def model_spec(cfg) -> dict:
    """Conv4 as the paper's Omniglot network: stride-2 convolutions (``pool=False``), 64 filters, and the
    features averaged over the remaining 2×2 positions before the linear head, as the original code does."""
    return {"name": "conv4", "in_channels": 1, "out_features": cfg.n_way, "hidden": cfg.filters,
            "image_size": cfg.image_size, "pool": cfg.pool, "global_pool": True}


def input_spec(cfg) -> dict:
    """Raw inputs are image files, read as mamlkit.data preprocesses Omniglot: grey levels, Lanczos resize,
    strokes bright, scaled to [0, 1]."""
    return {"type": "image", "mode": "L", "size": getattr(cfg, "image_size", 28), "invert": True, "scale": 1 / 255}


def prepare_data(data_root: str, trust_checksum: bool, download_missing: bool) -> str:
    """``mamlkit data omniglot``: download (when missing and allowed), verify and build the cache."""
    folder = ensure_omniglot(data_root, download_missing=download_missing)
    ds = load_omniglot(folder, trust_checksum=trust_checksum)
    bg = int(ds.background.sum())
    return (f"omniglot: {folder} verified; {bg} background + {len(ds.names) - bg} evaluation characters, "
            f"images {tuple(ds.images.shape)} uint8, cache {cache_root() / 'omniglot'}")


def report(cfg) -> Report:
    """Accuracy after each test-time step; the report names the character split and the rotations."""
    return Report(table="steps", describe=(f"Omniglot split {cfg.split!r}, rotations {cfg.rotations!r}.",))


__all__ = ["OmniglotTasks", "split_indices", "rotated", "omniglot_split", "build", "model_spec", "input_spec",
           "prepare_data", "report", "SPLITS", "ROTATIONS", "SPLIT_SEED"]
