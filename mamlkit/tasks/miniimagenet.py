"""mini-ImageNet N-way K-shot classification on the user's own copy (Vinyals et al. 2016; Ravi &
Larochelle 2017 split; Finn et al. 2017, §5.2).

mamlkit does not download mini-ImageNet (ImageNet's terms). It reads a folder the user made:

    <data-root>/miniimagenet/            (or <data-root> itself, when it holds the CSVs)
        images/<file name>.jpg           every image named in the CSVs (any size, any PIL format)
        train.csv  val.csv  test.csv     Ravi & Larochelle's split files: header ``filename,label``,
                                         one line per image (64 / 16 / 20 classes, 600 images each)

Each split is preprocessed once: images converted to RGB, resized to ``image_size``×``image_size``
(84) with an antialiasing (Lanczos) filter and stored as ``uint8 [C, M, 3, S, S]`` in a safetensors
cache in ``$MAMLKIT_CACHE/miniimagenet/`` (see :mod:`mamlkit.data`), written atomically. Classes are
sorted by label, images by file name. The cache records the sha256 of the CSV and of its own
pixels; a stale or corrupt cache is rebuilt. (The cache key is the CSV, not the images: after
replacing image files with the same names, delete the cache.)
"""

from __future__ import annotations

import csv
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.data import DataError, cache_root, dataset_dir
from mamlkit.data.caches import read_cache, write_cache
from mamlkit.data.imagefiles import open_image
from mamlkit.tasks.episodes import EpisodeSampler

CACHE_VERSION = 1
SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}


def read_split_csv(path: Path) -> dict[str, list[str]]:
    """``label -> sorted file names`` from a Ravi & Larochelle CSV (header ``filename,label``)."""
    if not path.is_file():
        raise DataError(f"{path} not found. mini-ImageNet needs the Ravi & Larochelle split files train.csv, "
                        f"val.csv and test.csv and an images/ folder in {path.parent} (see `mamlkit.tasks."
                        "miniimagenet`); pass the folder with --data-root DIR or $MAMLKIT_DATA=DIR.")
    classes: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise DataError(f"{path}: expected a header line 'filename,label' (the Ravi & Larochelle format)")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0] or not row[1]:
            raise DataError(f"{path}, line {i}: expected 'filename,label', got {row!r}")
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    return {label: sorted(files) for label, files in sorted(classes.items())}


def load_split(folder: Path, split: str, size: int = 84, progress: bool = True) -> tuple[Tensor, list[str]]:
    """``(images uint8 [C, M, 3, size, size], labels)`` of ``split``, from the cache or built once."""
    from PIL import Image
    from tqdm.auto import tqdm

    csv_path = folder / SPLIT_FILES[split]
    classes = read_split_csv(csv_path)
    counts = {len(v) for v in classes.values()}
    if len(counts) != 1:
        raise DataError(f"{csv_path}: every class needs the same number of images, got counts "
                        f"{sorted(counts)}")
    source = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    name = f"miniimagenet{size}-{split}-v{CACHE_VERSION}-{source[:16]}.safetensors"
    cache = cache_root() / "miniimagenet" / name
    labels = list(classes)
    M = counts.pop()
    found = read_cache(cache, "images", digest_key="pixels_sha256", valid=lambda meta, images: (
        meta.get("source") == source and json.loads(meta["labels"]) == labels
        and tuple(images.shape) == (len(labels), M, 3, size, size)))
    if found is not None:
        return found[1], labels
    out = np.empty((len(labels), M, size, size, 3), dtype=np.uint8)
    with tqdm(total=len(labels) * M, desc=f"preprocessing mini-ImageNet {split}", unit="img",
              disable=not progress) as bar:
        for c, label in enumerate(labels):
            for m, fname in enumerate(classes[label]):
                path = folder / "images" / fname
                try:
                    with open_image(path, str(path)) as im:  # a UserError for an image of too many pixels
                        out[c, m] = np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS))
                except FileNotFoundError:
                    raise DataError(f"{path} is listed in {csv_path.name} but missing; put every image of "
                                    f"the split in {folder / 'images'}/") from None
                except (OSError, SyntaxError, ValueError) as e:
                    raise DataError(f"cannot decode {path} ({e}); replace the file") from None
            bar.update(M)
    images = torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous()
    try:
        write_cache(cache, "images", images, {"source": source, "labels": json.dumps(labels)},
                    digest_key="pixels_sha256")
    except OSError as e:  # a read-only or full disk costs a rebuild next time, nothing else
        import warnings

        warnings.warn(f"could not write the mini-ImageNet cache {cache}: {e}; it is preprocessed again next time",
                      stacklevel=2)
    return images, labels


@lru_cache(maxsize=6)
def _split(root: str, split: str, size: int) -> Tensor:
    folder = dataset_dir("miniimagenet", root or None, "train.csv")
    return load_split(folder, split, size)[0]


def build(cfg, split: str) -> EpisodeSampler:
    """``cfg.n_way``-way ``cfg.k_shot``-shot tasks on ``split``; inputs ``[T, N·K, 3, S, S]`` in [0, 1]."""
    if cfg.loss != "cross_entropy":
        raise UserError(f"mini-ImageNet is classification: use --loss cross_entropy (got {cfg.loss!r})")
    data = _split(cfg.data_root, split, cfg.image_size)
    try:
        return EpisodeSampler(data, cfg.n_way, cfg.k_shot, cfg.k_query)
    except ValueError as e:
        raise DataError(f"mini-ImageNet {split}: {e}") from None


def model_spec(cfg) -> dict:
    """The paper's mini-ImageNet Conv4: 32 filters, 2×2 max-pool, flattened features (5·5·32 on 84×84)."""
    return {"name": "conv4", "in_channels": 3, "out_features": cfg.n_way, "hidden": cfg.filters,
            "image_size": cfg.image_size, "pool": cfg.pool}


def input_spec(cfg) -> dict:
    """Raw inputs are image files: RGB, Lanczos resize to ``image_size``, scaled to [0, 1]."""
    return {"type": "image", "mode": "RGB", "size": getattr(cfg, "image_size", 84), "invert": False,
            "scale": 1 / 255}


def prepare_data(data_root: str, trust_checksum: bool, download_missing: bool) -> str:
    """``mamlkit data miniimagenet``: preprocess the user's copy into the cache (it is never downloaded)."""
    folder = dataset_dir("miniimagenet", data_root, "train.csv")
    lines = []
    for split in SPLIT_FILES:
        images, labels = load_split(folder, split)
        lines.append(f"miniimagenet {split}: {len(labels)} classes, images {tuple(images.shape)} uint8")
    return "\n".join(lines)


__all__ = ["read_split_csv", "load_split", "build", "model_spec", "input_spec", "prepare_data"]
