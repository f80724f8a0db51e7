"""N-way K-shot classification on any folder of labelled images: ``mamlkit train images --path DIR``.

Layouts read (detected in this order; the one found is named in a note and in the report):

* torchvision's extracted Omniglot: ``DIR`` is (or holds) ``omniglot-py/``, or is ``images_background/``
  or ``images_evaluation/``; the classes are ``<alphabet>/<character>`` of both folders present;
* CUB-200-2011: ``DIR`` is (or holds) ``CUB_200_2011/``, whose ``images/<class>/*.jpg`` are read;
* mini-ImageNet class folders (every class folder named like ``n01532829``), either directly in ``DIR``
  or in ``DIR/train``, ``DIR/val``, ``DIR/test``: those folders are pooled and the classes split again below;
* a plain folder of class folders (torchvision's ``ImageFolder``): ``DIR/<class>/...``. A class's images
  are every image file below its folder (``.png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm``).

Procedure (fixed, so a run is reproducible from its config and the folder alone):

1. Classes are split by name, never by image: every class name gets the key
   ``blake2b("mamlkit-images-split/1/" + name)`` (8 bytes, little-endian); classes sorted by key, the first
   ``round(f_train·n)`` are ``train``, the next ``round(f_val·n)`` ``val``, the rest ``test``
   (``--task-split``, default 0.7 0.15 0.15), as the Omniglot and CSV families split by a fixed hash.
2. Every image is decoded once, converted to grey levels (``--channels 1``, PIL mode ``L``) or RGB
   (``--channels 3``), resized to ``--image-size`` square with PIL's Lanczos filter (as ``mamlkit adapt``
   reads images for the checkpoint) and stored as ``uint8 [I, C, S, S]``, all classes of the folder in one
   safetensors cache in ``$MAMLKIT_CACHE/images/`` (see :mod:`mamlkit.data`), written atomically. The
   cache's name is a hash of the folder's listing (relative path, size and modification time of every
   image), so a changed folder gets a new cache; the cache also carries the sha256 of its own pixels, and a
   corrupt one is rebuilt. Images are decoded one at a time into the cache tensor: memory is the cache
   plus one image, whatever the number of classes.
3. Files that do not decode, images of more than :data:`~mamlkit.data.imagefiles.MAX_IMAGE_PIXELS` pixels
   and folders that cannot be read are skipped with a note naming them; symbolic links are followed, but a
   folder reached twice through links (a loop) is read once, with a note. A class folder's name that is not
   UTF-8 becomes a label with its bytes escaped (:func:`~mamlkit.data.imagefiles.class_name`).
4. Classes with fewer than ``k_shot + k_query`` images cannot give an episode: ``--small-classes skip``
   (default) drops them and notes the count per split; ``error`` refuses them, naming them.

Episodes: ``n_way`` distinct classes of the split in random order, then ``k_shot + k_query`` distinct
images of each class (support first), all from the ``torch.Generator`` given to ``sample``, so task k
depends only on (seed, split, k). Inputs are pixels / 255 in [0, 1].

The model is Conv4 (``filters`` channels, 2×2 max-pool with ``--pool``, the preset's default) or, with
``--model resnet12``, ResNet-12 (:func:`mamlkit.models.resnet12`, widths ``filters × (1, 2.5, 5, 10)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.data import cache_root
from mamlkit.data.caches import read_cache, write_cache
from mamlkit.data.imagefiles import MAX_IMAGE_PIXELS, class_name, open_image
from mamlkit.tasks.episodes import gather, sample_classes
from mamlkit.tasks.family import Report

log = logging.getLogger("mamlkit")

SPLIT_SEED = 1
CACHE_VERSION = 1  # bump when the preprocessing changes: older caches are then rebuilt
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
WNID = re.compile(r"n\d{8}")
OMNIGLOT_TOPS = ("images_background", "images_evaluation")
SPLIT_FOLDERS = ("train", "val", "test")
MAX_NAMED = 5  # files or classes named in one note or message


def _split_key(name: str) -> int:
    digest = hashlib.blake2b(f"mamlkit-images-split/{SPLIT_SEED}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_classes(names: list[str], fractions: tuple[float, ...]) -> dict[str, list[str]]:
    """Class names ``{"train", "val", "test"} -> names`` by the hash order of the module docstring."""
    order = sorted(names, key=_split_key)
    a = round(fractions[0] * len(order))
    b = a + round(fractions[1] * len(order))
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def _named(items: list[str]) -> str:
    more = len(items) - MAX_NAMED
    return ", ".join(items[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------------------
# The folder: layout, classes, files


@dataclass
class _Walk:
    """What walking a folder met besides images: folders reached again through links, broken entries."""

    loops: list[str]
    broken: list[str]
    unreadable: list[str]


def _subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders (links followed), sorted by name; entries that cannot be read are left out."""
    out = []
    for entry in _entries(folder):
        try:
            if entry.is_dir():
                out.append(Path(entry.path))
        except OSError:  # a link that loops on itself: not a folder
            pass
    return out


def _entries(folder: Path, unreadable: list[str] | None = None) -> list[os.DirEntry]:
    """The visible entries of ``folder``, sorted by name; none if it cannot be read, which is then listed in
    ``unreadable`` (with the reason) where given."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        if unreadable is not None:
            unreadable.append(f"{folder} ({e.strerror or type(e).__name__})")
        return []


def _image_files(folder: Path, walk: _Walk, seen: set[tuple[int, int]]) -> list[Path]:
    """Every image file below ``folder``, links followed; a folder whose (device, inode) is in ``seen``
    (reached again through a link: a loop) is not entered twice."""
    files, stack = [], [folder]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            walk.broken.append(str(d))
            continue
        if (st.st_dev, st.st_ino) in seen:
            walk.loops.append(str(d))
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in _entries(d, walk.unreadable):
            try:
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                        files.append(Path(entry.path))
                elif entry.is_symlink():
                    walk.broken.append(entry.path)
            except OSError:  # ELOOP: a link to itself
                walk.broken.append(entry.path)
    return sorted(files)


def detect_layout(root: Path) -> tuple[str, dict[str, list[Path]]]:
    """``(layout, class name -> its folders)`` of ``root`` (module docstring); no files are read yet."""
    for base in (root, root / "omniglot-py"):
        tops = [base] if base.name in OMNIGLOT_TOPS else [base / t for t in OMNIGLOT_TOPS if (base / t).is_dir()]
        if tops:
            classes = {f"{alphabet.name}/{char.name}": [char] for top in tops for alphabet in _subdirs(top)
                       for char in _subdirs(alphabet)}
            return f"torchvision Omniglot ({', '.join(t.name for t in tops)}; classes are alphabet/character)", classes
    for base in (root, root / "CUB_200_2011"):
        if (base / "images").is_dir() and (base.name == "CUB_200_2011" or (base / "classes.txt").is_file()):
            return "CUB-200-2011 (images/<class>/)", {d.name: [d] for d in _subdirs(base / "images")}
    subdirs = _subdirs(root)
    names = [d.name for d in subdirs]
    if subdirs and set(names) <= set(SPLIT_FOLDERS):
        inner = {d.name: _subdirs(d) for d in subdirs}
        if all(inner.values()) and all(WNID.fullmatch(c.name) for cs in inner.values() for c in cs):
            classes: dict[str, list[Path]] = {}
            for cs in inner.values():
                for c in cs:
                    classes.setdefault(c.name, []).append(c)
            return (f"mini-ImageNet class folders in {'/'.join(names)} (pooled, then split by class name)",
                    dict(sorted(classes.items())))
    if subdirs and all(WNID.fullmatch(n) for n in names):
        return "mini-ImageNet class folders", {d.name: [d] for d in subdirs}
    return "class folders (ImageFolder)", {d.name: [d] for d in subdirs}


def list_classes(root: str | os.PathLike) -> tuple[str, dict[str, list[Path]], _Walk]:
    """``(layout, class name -> sorted image files, what the walk met)`` of a folder of labelled images;
    classes without images are left out. Raises :class:`UserError` for a folder that yields no class."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}. Pass a folder with one sub-folder of images per class: "
                        "--path DIR")
    try:
        os.scandir(root).close()
    except OSError as e:
        raise UserError(f"cannot read the image folder {root} ({e.strerror}); give this user read access to it, "
                        "or pass another folder with --path") from None
    layout, folders = detect_layout(root)
    walk = _Walk([], [], [])
    top = root.stat()
    classes = {}
    for name, dirs in folders.items():
        seen = {(top.st_dev, top.st_ino)}  # a class folder that links back to the root is a loop too
        files = [f for d in dirs for f in _image_files(d, walk, seen)]
        if files:  # a name whose bytes are not UTF-8 becomes a label that is text (escaped)
            classes[class_name(name)] = files
    if not classes:
        loose = [e.name for e in _entries(root) if Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            raise UserError(f"{root} holds images ({_named(loose)}) but no class folders: put each class's images "
                            "in a sub-folder named after the class (DIR/<class>/<image>)")
        raise UserError(f"{root} holds no class folders with images (layout looked for: {layout}). Put each "
                        f"class's images in a sub-folder named after the class: DIR/<class>/<image>, with images "
                        f"ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return layout, classes, walk


# --------------------------------------------------------------------------------------
# Preprocessing and the cache


@dataclass(frozen=True)
class ImageFolder:
    """A folder of labelled images, preprocessed: ``images uint8 [I, C, S, S]`` class after class (classes
    sorted by name, images by path), ``counts[c]`` images of class ``names[c]``; ``notes`` says what was
    skipped or converted."""

    root: str
    layout: str
    images: Tensor
    names: tuple[str, ...]
    counts: tuple[int, ...]
    notes: tuple[str, ...]

    @property
    def offsets(self) -> Tensor:
        """``[len(names)]`` index of each class's first image in ``images``."""
        counts = torch.tensor(self.counts, dtype=torch.long)
        return torch.cumsum(counts, 0) - counts


def _listing_key(root: Path, classes: dict[str, list[Path]]) -> str:
    """sha256 of the listing: every image's class, relative path, size and modification time."""
    h = hashlib.sha256()
    for name, files in classes.items():
        for f in files:
            st = f.stat()
            # surrogateescape: a file name that is not UTF-8 hashes as its bytes
            h.update(f"{name}\0{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
                "utf-8", "surrogateescape"))
    return h.hexdigest()


def _decode(path: Path, size: int, mode: str) -> tuple[np.ndarray, str, tuple[int, int]]:
    """``(pixels uint8 [C, size, size], the file's mode, its size)``, as ``mamlkit adapt`` reads it."""
    from PIL import Image

    with open_image(path, str(path)) as im:  # a UserError for an image of too many pixels
        im.load()  # decode fully here, so a truncated file fails with its name
        original, dims = im.mode, im.size
        # "1" (bilevel) goes through "L" first, or PIL resizes without antialiasing
        arr = np.asarray(im.convert(mode).resize((size, size), Image.LANCZOS), dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), original, dims


def _preprocess(classes: dict[str, list[Path]], size: int, channels: int, progress: bool
                ) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode every image into one preallocated ``uint8 [I, C, S, S]`` array, one image at a time."""
    from PIL import Image
    from tqdm.auto import tqdm

    mode = "L" if channels == 1 else "RGB"
    total = sum(map(len, classes.values()))
    out = np.empty((total, channels, size, size), dtype=np.uint8)
    counts, unreadable, large, modes, sizes, i = [], [], [], {}, set(), 0
    with tqdm(total=total, desc="preprocessing images", unit="img", disable=not progress) as bar:
        for files in classes.values():
            n = 0
            for f in files:
                try:
                    out[i], original, dims = _decode(f, size, mode)
                except UserError:
                    large.append(str(f))
                except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
                    unreadable.append(f"{f} ({type(e).__name__})")
                else:
                    i, n = i + 1, n + 1
                    sizes.add(dims)
                    if original not in (mode, "1" if mode == "L" else mode):
                        modes[original] = modes.get(original, 0) + 1
                bar.update(1)
            counts.append(n)
    notes = []
    if unreadable:
        notes.append(f"skipped {len(unreadable)} file(s) that do not decode as images: {_named(unreadable)}")
    if large:
        notes.append(f"skipped {len(large)} image(s) of more than {MAX_IMAGE_PIXELS:,} pixels: {_named(large)}")
    if modes:
        notes.append(f"converted {sum(modes.values())} image(s) from {', '.join(sorted(modes))} to {mode}")
    if len(sizes) > 1:
        notes.append(f"resized images of {len(sizes)} different sizes to {size}x{size}")
    return out[:i], counts, notes


def load_folder(root: str | os.PathLike, size: int = 84, channels: int = 3, progress: bool = True) -> ImageFolder:
    """The folder's classes preprocessed (module docstring), from the cache or built and cached once.

    Raises :class:`UserError` for a missing folder or one without labelled images."""
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    root = Path(root).expanduser()
    layout, classes, walk = list_classes(root)
    notes = []
    if walk.loops:
        notes.append(f"read {len(walk.loops)} folder(s) reached again through symbolic links once (a loop): "
                     f"{_named(walk.loops)}")
    if walk.broken:
        notes.append(f"skipped {len(walk.broken)} broken link(s): {_named(walk.broken)}")
    if walk.unreadable:
        notes.append(f"skipped {len(walk.unreadable)} folder(s) that cannot be read, with the images in them: "
                     f"{_named(walk.unreadable)}")
    key = _listing_key(root, classes)
    cache = cache_root() / "images" / f"images{size}c{channels}-v{CACHE_VERSION}-{key[:16]}.safetensors"
    names = list(classes)
    found = read_cache(cache, "images", digest_key="pixels_sha256", valid=lambda meta, images: (
        meta.get("listing") == key and json.loads(meta["names"]) == names and images.dtype == torch.uint8
        and tuple(images.shape) == (sum(json.loads(meta["counts"])), channels, size, size)
        and isinstance(json.loads(meta["notes"]), list)))
    if found is not None:
        meta, images = found
        return _kept(ImageFolder(str(root), layout, images, tuple(names), tuple(json.loads(meta["counts"])),
                                 tuple(notes + json.loads(meta["notes"]))))
    pixels, counts, decode_notes = _preprocess(classes, size, channels, progress)
    if not len(pixels):
        raise UserError(f"no image in {root} decodes: {'; '.join(decode_notes)}. Replace the files with valid images")
    images = torch.from_numpy(pixels)
    meta = {"format": "mamlkit-images", "version": str(CACHE_VERSION), "listing": key, "names": json.dumps(names),
            "counts": json.dumps(counts), "notes": json.dumps(decode_notes)}
    try:
        write_cache(cache, "images", images, meta, digest_key="pixels_sha256")
    except OSError as e:  # a read-only disk costs a rebuild next time, nothing else
        notes.append(f"could not write the cache {cache} ({e}); the folder is preprocessed again next time")
    return _kept(ImageFolder(str(root), layout, images, tuple(names), tuple(counts), tuple(notes + decode_notes)))


def _kept(data: ImageFolder) -> ImageFolder:
    """``data`` without the classes whose every image failed to decode."""
    empty = [n for n, c in zip(data.names, data.counts) if c == 0]
    if not empty:
        return data
    names, counts = zip(*[(n, c) for n, c in zip(data.names, data.counts) if c > 0])
    note = f"left out {len(empty)} class(es) with no readable image: {_named(empty)}"
    return ImageFolder(data.root, data.layout, data.images, names, counts, (*data.notes, note))


# --------------------------------------------------------------------------------------
# Episodes


@dataclass(frozen=True, eq=False)
class FolderTasks:
    """N-way K-shot episodes over classes of unequal sizes.

    ``images uint8 [I, C, S, S]``; class ``c`` of the split owns ``images[offsets[c] : offsets[c] + counts[c]]``.
    ``sample(T, g)``: support ``x [T, N·K, C, S, S]`` float32 in [0, 1], ``y [T, N·K]``; query ``[T, N·Q, ...]``.
    """

    images: Tensor
    offsets: Tensor
    counts: Tensor
    n_way: int
    k_shot: int
    k_query: int
    kind: str = "classification"

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(classes [T, N], image indices into images [T, N, K+Q])``: distinct images of each class, the
        first ``K + Q`` of a uniform random order of its ``counts[c]`` images."""
        classes = sample_classes(len(self.counts), num_tasks, self.n_way, generator)
        counts = self.counts[classes]                                     # [T, N]
        noise = torch.rand(num_tasks, self.n_way, int(self.counts.max()), generator=generator)
        noise.masked_fill_(torch.arange(noise.shape[-1]) >= counts[..., None], 2.0)  # past the class's end: last
        order = noise.argsort(dim=-1)[..., :self.k_shot + self.k_query]
        return classes, self.offsets[classes][..., None] + order

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        classes, index = self.sample_indices(num_tasks, generator)
        # one flat pool of images: every (task, class) indexes row 0 at its own image indices
        return gather(self.images[None], torch.zeros_like(classes), index, self.k_shot, 1 / 255)


@lru_cache(maxsize=4)
def _folder(path: str, size: int, channels: int, progress: bool) -> ImageFolder:
    data = load_folder(path, size, channels, progress)
    log.warning("mamlkit: %s: %s layout, %d classes, %d images at %dx%d, %d channel(s)", path, data.layout,
                len(data.names), int(sum(data.counts)), size, size, channels)
    for note in data.notes:
        log.warning("mamlkit: %s", note)
    return data


def split_of(cfg, split: str) -> tuple[ImageFolder, list[int], list[str]]:
    """``(folder, indices of the split's classes kept, names of those too small)`` under ``cfg``."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if not cfg.path:
        raise UserError("pass the folder of labelled images with --path DIR (one sub-folder of images per class)")
    data = _folder(str(Path(cfg.path).expanduser().resolve()), cfg.image_size, cfg.channels, cfg.progress)
    names = split_classes(list(data.names), cfg.task_split)[split]
    position = {n: i for i, n in enumerate(data.names)}
    need = cfg.k_shot + cfg.k_query
    small = [n for n in names if data.counts[position[n]] < need]
    kept = sorted(position[n] for n in names if data.counts[position[n]] >= need)
    return data, kept, small


def build(cfg, split: str) -> FolderTasks:
    """``cfg.n_way``-way ``cfg.k_shot``-shot tasks on the ``split`` classes of the folder ``cfg.path``."""
    if cfg.loss != "cross_entropy":
        raise UserError(f"image classes are classification: use --loss cross_entropy (got {cfg.loss!r})")
    data, kept, small = split_of(cfg, split)
    need = cfg.k_shot + cfg.k_query
    if small and cfg.small_classes == "error":
        raise UserError(f"{len(small)} {split} class(es) have fewer than k_shot + k_query = {need} images: "
                        f"{_named(small)}. Add images, lower --k-shot/--k-query, or pass --small-classes skip")
    if small:
        log.warning("mamlkit: skipped %d %s class(es) with fewer than %d images (k_shot + k_query)", len(small),
                    split, need)
    if len(kept) < cfg.n_way:
        total = len(data.names)
        raise UserError(f"{cfg.n_way}-way tasks need {cfg.n_way} classes in {split}, but the folder's {total} "
                        f"class(es), split {'/'.join(f'{f:g}' for f in cfg.task_split)} by name, leave {len(kept)} "
                        f"there with at least {need} images{f' ({len(small)} too small)' if small else ''}. Use a "
                        "folder with more classes, a smaller --n-way, or fewer --k-shot/--k-query images")
    offsets, counts = data.offsets, torch.tensor(data.counts, dtype=torch.long)
    index = torch.tensor(kept, dtype=torch.long)
    return FolderTasks(data.images, offsets[index], counts[index], cfg.n_way, cfg.k_shot, cfg.k_query)


def model_spec(cfg) -> dict:
    """Conv4 (``--filters``, max-pool with ``--pool``) by default; ResNet-12 with ``--model resnet12``."""
    if cfg.model == "resnet12":
        return {"name": "resnet12", "in_channels": cfg.channels, "out_features": cfg.n_way, "hidden": cfg.filters}
    return {"name": "conv4", "in_channels": cfg.channels, "out_features": cfg.n_way, "hidden": cfg.filters,
            "image_size": cfg.image_size, "pool": cfg.pool}


def input_spec(cfg) -> dict:
    """Raw inputs are image files, read as the folder was: grey or RGB, Lanczos resize, scaled to [0, 1]."""
    return {"type": "image", "mode": "L" if cfg.channels == 1 else "RGB", "size": cfg.image_size, "invert": False,
            "scale": 1 / 255}


def report(cfg) -> Report:
    """Accuracy after each test-time step; the report names the folder, its layout and the class split."""
    data, kept, small = split_of(cfg, "test")
    sizes = {s: len(names) for s, names in split_classes(list(data.names), cfg.task_split).items()}
    return Report(table="steps", title=f"Images in {data.root}", describe=(
        f"Layout: {data.layout}; {len(data.names)} classes split {sizes['train']}/{sizes['val']}/{sizes['test']} "
        f"(train/val/test) by name; {len(kept)} test classes with at least {cfg.k_shot + cfg.k_query} images, "
        f"{len(small)} skipped.",))


__all__ = ["ImageFolder", "FolderTasks", "detect_layout", "list_classes", "load_folder", "split_classes", "split_of",
           "build", "model_spec", "input_spec", "report"]
