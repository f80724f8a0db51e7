"""Reading a user's own task from disk: image folders (ImageFolder layout) and CSVs of numbers (vector inputs).

Every problem with the input is a :class:`~mamlkit.base.errors.UserError` that names the file and
the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.data.imagefiles import class_name, open_image
from mamlkit.data.tables import beyond, is_missing, number, overflow_cells, read_rows

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


def read_numbers(path: str | Path, columns: list[str], rows: list[dict[str, str]], lines: list[int],
                 dtype: torch.dtype = torch.float64) -> np.ndarray:
    """The ``columns`` of ``rows`` (read by :func:`mamlkit.data.tables.read_rows`) as float64 ``[rows,
    columns]``, every value a number that is finite in ``dtype`` (the model's: 1e39 is finite in float64 but
    not in float32). Anything else (text, NaN, inf, a number too large for float64 such as 1e309, or one too
    large for ``dtype``) is a :class:`UserError` naming the file, line and column."""
    values = np.empty((len(rows), len(columns)), dtype=np.float64)
    for i, (line, r) in enumerate(zip(lines, rows)):
        for j, c in enumerate(columns):
            x = number(r[c])
            if x is None:
                raise UserError(f"{path} line {line} column {c!r} is {r[c]!r}: not a finite number. Every "
                                "value after the header must be a number (no NaN, inf, or magnitudes beyond 1e308)")
            values[i, j] = x
    cells = overflow_cells(torch.from_numpy(values), dtype)
    if cells:
        where = "; ".join(f"line {lines[i]} column {columns[j]!r} is {rows[i][columns[j]]!r}" for i, j in cells[:5])
        raise UserError(f"{path} {where}{' ...' if len(cells) > 5 else ''}: {beyond(dtype)}. Rescale the column")
    return values


def load_vector_csv(path: str | Path, in_features: int, *, target: str | None, dtype: torch.dtype = torch.float64
                    ) -> tuple[Tensor, Tensor | list[str] | None]:
    """The rows of a vector checkpoint's CSV: ``in_features`` input columns, then with ``target="value"`` a
    numeric target (regression) or with ``target="label"`` a class label, or (``None``, a query) nothing more.
    Returns inputs ``[n, in_features]`` float64 (every value finite in ``dtype``, the model's) and the targets
    ``[n, 1]`` float64, the labels (stripped strings), or None."""
    header, rows, lines = read_rows(path)
    need = in_features + (target is not None)
    if len(header) != need:
        what = f"{in_features} input column(s)" + {"value": " and a target column", "label": " and a label column",
                                                   None: ""}[target]
        raise UserError(f"{path} has columns {header}; this model takes {what}")
    values = read_numbers(path, header if target == "value" else header[:in_features], rows, lines, dtype)
    x = torch.from_numpy(values[:, :in_features])
    if target == "value":
        return x, torch.from_numpy(values[:, in_features:])
    if target == "label":
        gaps = [n for r, n in zip(rows, lines) if is_missing(r[header[-1]])]
        if gaps:
            raise UserError(f"{path}: the label is missing on line(s) {', '.join(map(str, gaps[:10]))}; every "
                            "support row needs one")
        return x, [r[header[-1]].strip() for r in rows]
    return x, None
