"""Datasets on disk: where they live, checking them, downloading them, and caching them preprocessed.

Where the data lives (first that applies):

1. ``--data-root DIR`` (``TrainConfig.data_root``),
2. the environment variable ``MAMLKIT_DATA``,
3. the default cache folder ``$XDG_CACHE_HOME/mamlkit`` (``~/.cache/mamlkit`` when unset).

A dataset's folder is ``DIR/<dataset>`` (``DIR/omniglot``); ``DIR`` itself is accepted when it
directly holds the dataset's files or is named after it, so ``--data-root DIR/omniglot`` works too.
Preprocessed caches never go into the data folder (it may be shared or read-only) but into
``$MAMLKIT_CACHE`` (default: the default cache folder above), under ``<dataset>/``.

Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015) is read from the two official zips,
``images_background.zip`` and ``images_evaluation.zip``. Each zip must match a known checksum:
the md5 of the official files, or the sha256/md5 of known rebuilt copies (same PNGs in rebuilt
zip containers). A file matching neither is refused
unless the user passes ``--trust-checksum``.

Preprocessing happens once: every drawing is converted to grey levels, resized to 28×28 with an
antialiasing (Lanczos) filter, inverted so that strokes are bright (the original MAML code's
``1 - x`` convention) and stored as one ``uint8`` tensor ``[1623, 20, 28, 28]`` in a safetensors
file, written atomically. The file carries the zips' sha256 and the sha256 of its own pixel
bytes; a cache whose pixels, shape or sources do not match is rebuilt. Reloading takes well
under a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.checkpoint import atomic_write
from mamlkit.data.caches import read_cache, write_cache
from mamlkit.data.imagefiles import open_image

ENV_VAR = "MAMLKIT_DATA"
CACHE_ENV_VAR = "MAMLKIT_CACHE"
CACHE_VERSION = 1  # bump when the preprocessing changes: older caches are then rebuilt


class DataError(UserError):
    """Missing, corrupt or unverifiable data; the message says what to download and where."""


def default_root() -> Path:
    """``$XDG_CACHE_HOME/mamlkit``, or ``~/.cache/mamlkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mamlkit"


def cache_root() -> Path:
    """Where preprocessed tensors go: ``$MAMLKIT_CACHE``, else :func:`default_root`."""
    return Path(os.environ[CACHE_ENV_VAR]).expanduser() if os.environ.get(CACHE_ENV_VAR) else default_root()


def resolve_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_root`` if given (non-empty), else ``$MAMLKIT_DATA``, else
    :func:`default_root`."""
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return default_root()


def dataset_dir(name: str, data_root: str | os.PathLike | None, marker: str | tuple[str, ...]) -> Path:
    """The folder of dataset ``name``: ``ROOT/name``, or ``ROOT`` itself when it holds a ``marker`` file
    or is itself called ``name`` (``--data-root DIR/omniglot`` before the files are there)."""
    root = resolve_root(data_root)
    markers = (marker,) if isinstance(marker, str) else marker
    if any((root / m).exists() for m in markers) and not any((root / name / m).exists() for m in markers):
        return root
    if root.name == name and not (root / name).exists():
        return root
    return root / name


# --------------------------------------------------------------------------------------
# Checksums


@dataclass(frozen=True)
class KnownFile:
    """A file and the checksums of its known versions (``version name -> hex digest``)."""

    name: str
    url: str
    md5: dict[str, str]
    sha256: dict[str, str]


OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
OMNIGLOT_FILES = (
    KnownFile("images_background.zip", OMNIGLOT_URL + "images_background.zip",
              md5={"official": "68d2efa1b9178cc56df9314c21c6e718",
                   "rebuilt": "5afe6aa42e6dd80468fe296dcd50e5f8"},
              sha256={"rebuilt": "7a4cae547f16207901bd3acaabd866c1dbbef4d559dff26d797dbc6423a64a1e"}),
    KnownFile("images_evaluation.zip", OMNIGLOT_URL + "images_evaluation.zip",
              md5={"official": "6b91aef0f799c5bb55b94e3f2daec811",
                   "rebuilt": "2a90290f67f5f97f4539554fdba2d740"},
              sha256={"rebuilt": "d84af890b3ea334eca90f1cb04c6111603a1b620d66b82f86414b8707fbd0e8d"}),
)
OMNIGLOT_COUNTS = {"images_background": 964, "images_evaluation": 659}
DRAWINGS = 20


def file_digests(path: Path) -> tuple[str, str]:
    """``(md5, sha256)`` of a file, read once."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def verify_file(path: Path, known: KnownFile, trust_checksum: bool = False) -> str:
    """Check ``path`` against ``known``; return its sha256. Unknown digests raise :class:`DataError`
    unless ``trust_checksum``."""
    md5, sha = file_digests(path)
    if md5 in known.md5.values() or sha in known.sha256.values() or trust_checksum:
        return sha
    expected = ", ".join([f"md5 {v} ({k})" for k, v in known.md5.items()] +
                         [f"sha256 {v} ({k})" for k, v in known.sha256.items()])
    raise DataError(f"{path} has an unknown checksum (md5 {md5}, sha256 {sha}); expected one of: {expected}. "
                    f"The file may be truncated or corrupt: delete it and download it again from {known.url} "
                    "(`mamlkit data omniglot` does this). If you know the file is good, pass "
                    "--trust-checksum.")


def download(url: str, dest: Path, progress: bool = True) -> None:
    """Download ``url`` to ``dest`` atomically, with a progress bar.
    Raises ``urllib.error.URLError`` offline."""
    from tqdm.auto import tqdm

    def write(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for block in iter(lambda: resp.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))

    atomic_write(dest, write)


def _missing_message(folder: Path, missing: list[KnownFile], reason: str = "") -> str:
    lines = [f"Omniglot is not in {folder}{reason}. Download these files:"]
    lines += [f"  {k.url}" for k in missing]
    names = ", ".join(k.name for k in missing)
    lines += [f"and put them in {folder}/ (keep the names {names}; do not unzip).",
              f"Or point mamlkit at the folder that holds them (or holds omniglot/) with --data-root DIR or "
              f"{ENV_VAR}=DIR.",
              "Online, `mamlkit data omniglot` (or `mamlkit data omniglot --data-root DIR`) downloads and checks "
              "them for you."]
    return "\n".join(lines)


def ensure_omniglot(data_root: str | os.PathLike | None = None, *, download_missing: bool = False,
                    progress: bool = True) -> Path:
    """The Omniglot folder, after downloading missing zips if ``download_missing`` (and online).

    Raises :class:`DataError` naming the URLs and the folder when files are missing.
    """
    folder = dataset_dir("omniglot", data_root, tuple(k.name for k in OMNIGLOT_FILES))
    missing = [k for k in OMNIGLOT_FILES if not (folder / k.name).is_file()]
    if missing and download_missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for k in missing:
                download(k.url, folder / k.name, progress=progress)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            missing = [k for k in missing if not (folder / k.name).is_file()]
            raise DataError(_missing_message(folder, missing, f" and downloading failed ({e})")) from None
        missing = []
    if missing:
        raise DataError(_missing_message(folder, missing))
    return folder


# --------------------------------------------------------------------------------------
# Omniglot: preprocessing and cache


@dataclass(frozen=True)
class Omniglot:
    """All 1623 Omniglot characters, preprocessed.

    ``images``: ``uint8 [1623, 20, 28, 28]``, strokes bright (255), background 0; characters in the
    order of ``names`` (``"images_background/<Alphabet>/characterNN"``, background first, each zip
    sorted by alphabet then character), drawings sorted by file name (drawer 01..20).
    """

    images: Tensor
    names: tuple[str, ...]

    @property
    def background(self) -> Tensor:
        """Boolean mask ``[1623]``: the character is in ``images_background``."""
        return torch.tensor([n.startswith("images_background/") for n in self.names])


def _character_files(zf: zipfile.ZipFile, top: str) -> dict[str, list[str]]:
    chars: dict[str, list[str]] = {}
    for name in zf.namelist():
        if name.endswith(".png"):
            parts = name.split("/")
            if len(parts) != 4 or parts[0] != top:
                raise DataError(f"unexpected member {name!r} in {top}.zip: expected {top}/<Alphabet>/"
                                "characterNN/<id>_<drawer>.png. Download the official zip again.")
            chars.setdefault("/".join(parts[:3]), []).append(name)
    return chars


MAX_MEMBER_BYTES = 1 << 20  # an official drawing is about 1 kB; the bound keeps a crafted zip from filling memory


def _drawing(zf: zipfile.ZipFile, member: str, known: KnownFile, size: int) -> np.ndarray:
    """The zip member ``member`` as grey levels ``uint8 [size, size]`` (Lanczos). A member that is too large
    (declared or decoded) or does not decode is a :class:`DataError` naming it."""
    from PIL import Image

    again = f"download it again from {known.url}."
    if zf.getinfo(member).file_size > MAX_MEMBER_BYTES:
        raise DataError(f"{member} in {known.name} is {zf.getinfo(member).file_size:,} bytes, not an Omniglot "
                        f"drawing (about 1 kB); {again}")
    try:
        with open_image(io.BytesIO(zf.read(member)), f"{member} in {known.name}") as im:
            # Mode "1" must become "L" first, or PIL resizes without antialiasing.
            return np.asarray(im.convert("L").resize((size, size), Image.LANCZOS))
    except UserError as e:
        raise DataError(f"{e}. It is not an Omniglot drawing: {again}") from None
    except (OSError, zipfile.BadZipFile, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode {member} in {known.name} ({e}); {again}") from None


def preprocess_omniglot(folder: Path, size: int = 28, progress: bool = True) -> Omniglot:
    """Read both zips and resize every drawing to ``size × size`` (grey levels, Lanczos antialiasing)."""
    from tqdm.auto import tqdm

    images, names = [], []
    for known in OMNIGLOT_FILES:
        top = known.name.removesuffix(".zip")
        try:
            zf = zipfile.ZipFile(folder / known.name)
        except zipfile.BadZipFile as e:
            raise DataError(f"{folder / known.name} is not a valid zip ({e}); delete it and download it "
                            f"again from {known.url}.") from None
        with zf:
            chars = _character_files(zf, top)
            if len(chars) != OMNIGLOT_COUNTS[top]:
                raise DataError(f"{known.name} holds {len(chars)} characters, expected "
                                f"{OMNIGLOT_COUNTS[top]}; download it again from {known.url}.")
            out = np.empty((len(chars), DRAWINGS, size, size), dtype=np.uint8)
            bar = tqdm(total=len(chars) * DRAWINGS, desc=f"preprocessing {top}", unit="img",
                       disable=not progress)
            for c, char in enumerate(sorted(chars)):
                files = sorted(chars[char])
                if len(files) != DRAWINGS:
                    raise DataError(f"{known.name}: {char} has {len(files)} drawings, expected {DRAWINGS}.")
                for d, member in enumerate(files):
                    out[c, d] = 255 - _drawing(zf, member, known, size)
                bar.update(DRAWINGS)
            bar.close()
            images.append(torch.from_numpy(out))
            names += sorted(chars)
    return Omniglot(torch.cat(images), tuple(names))


def cache_path(sources: list[str], size: int) -> Path:
    """Where the preprocessed tensor goes: ``cache_root()/omniglot/``. The name depends on the zips'
    sha256, so other zips get another file."""
    key = hashlib.sha256("|".join(sources).encode()).hexdigest()[:16]
    return cache_root() / "omniglot" / f"omniglot{size}-v{CACHE_VERSION}-{key}.safetensors"


def save_cache(path: Path, data: Omniglot, sources: list[str]) -> None:
    meta = {"format": "mamlkit-omniglot", "version": str(CACHE_VERSION), "sources": json.dumps(sources),
            "names": json.dumps(list(data.names))}
    write_cache(path, "images", data.images.contiguous(), meta, digest_key="pixels_sha256")


def load_cache(path: Path, sources: list[str], size: int) -> Omniglot | None:
    """The cached dataset, or ``None`` when the file is missing, unreadable, stale or corrupt."""
    def valid(meta: dict[str, str], images: Tensor) -> bool:
        return (meta.get("format") == "mamlkit-omniglot" and meta.get("version") == str(CACHE_VERSION)
                and json.loads(meta["sources"]) == sources and images.dtype == torch.uint8
                and tuple(images.shape) == (sum(OMNIGLOT_COUNTS.values()), DRAWINGS, size, size)
                and len(json.loads(meta["names"])) == images.shape[0])

    found = read_cache(path, "images", digest_key="pixels_sha256", valid=valid)
    return None if found is None else Omniglot(found[1], tuple(json.loads(found[0]["names"])))


def load_omniglot(data_root: str | os.PathLike | None = None, *, trust_checksum: bool = False,
                  download_missing: bool = False, progress: bool = True, size: int = 28) -> Omniglot:
    """Omniglot, verified and preprocessed; built and cached on first use.

    Raises :class:`DataError` when the zips are missing (naming what to download and where) or
    have an unknown checksum (unless ``trust_checksum``).
    """
    folder = ensure_omniglot(data_root, download_missing=download_missing, progress=progress)
    sources = [verify_file(folder / k.name, k, trust_checksum) for k in OMNIGLOT_FILES]
    path = cache_path(sources, size)
    data = load_cache(path, sources, size)
    if data is None:
        data = preprocess_omniglot(folder, size, progress)
        try:
            save_cache(path, data, sources)
        except OSError as e:  # a read-only disk costs a rebuild next time, nothing else
            import warnings

            warnings.warn(f"could not write the Omniglot cache {path}: {e}", stacklevel=2)
    return data


__all__ = ["DataError", "resolve_root", "default_root", "dataset_dir", "verify_file", "download",
           "ensure_omniglot", "load_omniglot", "preprocess_omniglot", "Omniglot", "OMNIGLOT_FILES"]
