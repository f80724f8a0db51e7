"""Opening image files with a bound on their size, read from the file's header before any pixel is decoded,
and class folders' names as labels.

A small file can declare a huge image (a 20000×20000 PNG of zeros compresses to a few kB and decodes to
400 MB; Pillow warns from 89 million pixels and refuses only from twice that). Every image mamlkit reads (the
Omniglot zips, mini-ImageNet, image folders, the files given to ``mamlkit adapt``) goes through
:func:`open_image`, which refuses one beyond :data:`MAX_IMAGE_PIXELS` with a message naming the file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import IO, Any

from mamlkit.base.errors import UserError

# Pillow's own warning threshold (0.27 GB decoded as RGB): an 80-megapixel photo is read, a bomb is not.
MAX_IMAGE_PIXELS = 89_478_485


@contextlib.contextmanager
def open_image(source: str | IO[bytes] | Any, name: str) -> Iterator[Any]:
    """``PIL.Image.open(source)``, not yet decoded, closed at the end of the block. Raises :class:`UserError`
    naming ``name`` when the image declares more than :data:`MAX_IMAGE_PIXELS` pixels; Pillow's own errors
    for files that are not images (``OSError``, ``SyntaxError``, ``ValueError``) pass through."""
    from PIL import Image

    fix = "resize it (mamlkit resizes every image to the model's input size anyway) or remove it"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound below is the one that holds
        try:
            im = Image.open(source)
        except Image.DecompressionBombError as e:
            raise UserError(f"image {name} is too large to read ({e}); {fix}") from None
    with im:
        width, height = im.size
        if width * height > MAX_IMAGE_PIXELS:
            raise UserError(f"image {name} is {width}x{height} = {width * height:,} pixels, more than the "
                            f"{MAX_IMAGE_PIXELS:,} mamlkit reads; {fix}")
        yield im


def class_name(folder_name: str) -> str:
    """A class folder's name as a label that is text everywhere (reports, JSON, the terminal): a name whose
    bytes are not UTF-8 (Python keeps those bytes as surrogates) gets them backslash-escaped, ``caf\\xe9``
    for the Latin-1 ``café``; every UTF-8 name is itself."""
    return folder_name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


__all__ = ["MAX_IMAGE_PIXELS", "open_image", "class_name"]
