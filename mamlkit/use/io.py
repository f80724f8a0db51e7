"""Reading a user's own task from disk: image folders (ImageFolder layout) and CSV files.

Every problem with the input is a :class:`~mamlkit.base.errors.UserError` that names the file and
the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.data.imagefiles import class_name, open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_image(path: Path, spec: dict[str, Any], notes: set[str]) -> Tensor:
    """One image as the checkpoint's input spec: ``[C, size, size]`` float in the trained scale."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_image(path, str(path)) as im:
            im.load()  # decode fully now, so a truncated file fails here with its name
            mode = im.mode
            target = spec.get("mode", "L")
            if mode not in (target, "1" if target == "L" else target):
                notes.add(f"converted {mode} images to {target} to match the model's input")
            # "1" (bilevel) goes through "L" first, or PIL resizes without antialiasing
            im = im.convert("L") if target == "L" else im.convert("RGB")
            size = int(spec["size"])
            im = im.resize((size, size), Image.LANCZOS)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}. Remove the file or replace it with a valid image.") from None
    if spec.get("invert"):
        arr = 255.0 - arr
    arr = arr * float(spec.get("scale", 1 / 255))
    x = torch.from_numpy(arr)
    return x[None] if x.dim() == 2 else x.permute(2, 0, 1)


def _images_in(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    bad = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if bad:
        raise UserError(f"{folder} holds files that are not images: {', '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}. Class folders may hold only images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def load_image_folder(root: str | Path, spec: dict[str, Any]) -> tuple[Tensor, Tensor, list[str], set[str]]:
    """A support set in the ImageFolder layout: ``root/<class name>/<image>``.

    Returns ``x [N, C, H, W]``, ``y [N]`` (classes numbered in sorted folder-name order), the class
    names, and notes about conversions made.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"support folder not found: {root}. Pass a folder with one sub-folder per class.")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"{root} has {len(classes)} class folder(s); a few-shot task needs at least 2 "
                        "(one sub-folder per class, each with its example images).")
    notes: set[str] = set()
    xs, ys = [], []
    for label, folder in enumerate(classes):
        files = _images_in(folder)
        if not files:
            raise UserError(f"class folder {folder} is empty; put at least one example image in it.")
        for f in files:
            xs.append(load_image(f, spec, notes))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys), [class_name(c.name) for c in classes], notes


def load_query_images(paths: list[str], spec: dict[str, Any]) -> tuple[Tensor, list[Path], set[str]]:
    """Query images from files and/or folders (folders are searched recursively)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"query file not found: {p}")
    if not files:
        raise UserError(f"no query images found in {', '.join(paths)}")
    notes: set[str] = set()
    return torch.stack([load_image(f, spec, notes) for f in files]), files, notes


def read_csv_table(path: str | Path, dtype: torch.dtype = torch.float64) -> tuple[list[str], np.ndarray]:
    """A numeric CSV with a header row: ``(columns, values [rows, columns])`` in float64, every value a
    number that is finite in ``dtype`` (the model's: 1e39 is finite in float64 but not in float32).

    Anything else (not UTF-8, a ragged line, text, NaN, inf, a number too large for float64 such as 1e309,
    or one too large for ``dtype``) is a :class:`UserError` naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1) if r]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} as a UTF-8 CSV file ({e}); save it as UTF-8") from None
    if len(rows) < 2:
        raise UserError(f"{path} needs a header row and at least one data row")
    header, body = rows[0][1], rows[1:]
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for i, (line, r) in enumerate(body):
        if len(r) != len(header):
            raise UserError(f"{path} line {line} has {len(r)} values but the header names {len(header)} columns")
        for j, v in enumerate(r):
            try:
                x = float(v)
            except ValueError:
                x = None
            if x is None or not math.isfinite(x):
                raise UserError(f"{path} line {line} column {header[j]!r} is {v!r}: not a finite number. Every "
                                "value after the header must be a number (no NaN, inf, or magnitudes beyond 1e308)")
            values[i, j] = x
    cells = overflow_cells(torch.from_numpy(values), dtype)
    if cells:
        where = "; ".join(f"line {body[i][0]} column {header[j]!r} is {body[i][1][j]!r}" for i, j in cells[:5])
        raise UserError(f"{path} {where}{' ...' if len(cells) > 5 else ''}: {beyond(dtype)}. Rescale the column")
    return header, values


def overflow_cells(values: Tensor, dtype: torch.dtype) -> list[tuple[int, ...]]:
    """The positions of ``values`` that are finite as given but not once cast to ``dtype``, the model's
    (1e39, or a standardised 1e38, in float32): checked after the cast, where the model meets them."""
    bad = torch.isfinite(values) & ~torch.isfinite(values.to(dtype))
    return [tuple(i) for i in bad.nonzero().tolist()]


def beyond(dtype: torch.dtype) -> str:
    """How the message of a value beyond ``dtype``'s range ends."""
    name = str(dtype).removeprefix("torch.")
    return f"beyond the range of {name} (±{torch.finfo(dtype).max:.3g}), in which the model computes"


def load_regression_csv(path: str | Path, in_features: int, with_target: bool, dtype: torch.dtype = torch.float64
                        ) -> tuple[Tensor, Tensor | None]:
    """Support (``with_target``: the last column is the target) or query rows for a regression model whose
    parameters are ``dtype`` (every value must be finite in it; the tensors returned are float64)."""
    header, values = read_csv_table(path, dtype)
    need = in_features + (1 if with_target else 0)
    if values.shape[1] != need:
        what = f"{in_features} input column(s) and a target column" if with_target else \
            f"{in_features} input column(s)"
        raise UserError(f"{path} has columns {header}; this model takes {what}")
    x = torch.from_numpy(values[:, :in_features])
    return x, (torch.from_numpy(values[:, in_features:]) if with_target else None)
