"""Raw inputs of text checkpoints as model inputs, and the files `mamlkit adapt` reads for them.

* Text (task ``clinc``): utterances are encoded with the checkpoint's own encoder recipe
  (:mod:`mamlkit.data.encoders`): ``frozen`` gives the sentence embedding ``[384]``; ``finetune`` the hidden
  states entering the adapted layers, ``[max_tokens, 385]``, rounded through float16 exactly as the
  training cache stores them, so an utterance meets the model as it did in meta-training.

CSV-task rows are encoded by :mod:`mamlkit.data.tables`, the encoding of meta-training itself.

Every problem with the input is a :class:`~mamlkit.base.errors.UserError` naming the file, the lines or
columns, and the fix (the CLI exits with code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.base.limits import MAX_TABLE_BYTES, check_count
from mamlkit.data.tables import read_rows


def encode_texts(texts: list[str], spec: dict[str, Any]) -> Tensor:
    """Utterances as the text model's inputs: ``[n, 384]`` (frozen) or ``[n, max_tokens, 385]`` (finetune)."""
    from mamlkit.data import encoders

    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise UserError(f"text inputs must be non-empty strings; item(s) {bad[:10]} are not")
    if spec.get("mode") == "finetune":
        _, hidden = encoders.encode(list(texts), hidden_layer=int(spec["hidden_layer"]),
                                    pad_to=int(spec["max_tokens"]))
        return hidden.half().float()  # the training cache holds float16: the same numbers here
    return encoders.encode(list(texts))


def _first(values: list[int], limit: int = 10) -> str:
    """``"3, 7, 9"``: at most ``limit`` line numbers, then how many more."""
    return ", ".join(map(str, values[:limit])) + (f" and {len(values) - limit} more" if len(values) > limit else "")


# --------------------------------------------------------------------------------------
# Files for `mamlkit adapt`


def _column(path, header: list[str], name: str, flag: str, what: str) -> None:
    if name not in header:
        raise UserError(f"{path} has no column {name!r} ({what}); its columns are {', '.join(header)}. Rename the "
                        f"column or pass {flag} NAME")


def read_text_support(path: str | Path, text_column: str = "text", label_column: str = "label"
                      ) -> tuple[list[str], list[str]]:
    """A support CSV of (text, label) rows: ``(texts, labels)``; empty texts or labels are errors."""
    header, rows, lines = read_rows(path)
    _column(path, header, text_column, "--text-column", "the utterances")
    _column(path, header, label_column, "--label-column", "the class labels")
    empty = [n for r, n in zip(rows, lines) if not r[text_column].strip() or not r[label_column].strip()]
    if empty:
        raise UserError(f"{path}: empty text or label on line(s) {_first(empty)}; every support row needs both")
    return [r[text_column].strip() for r in rows], [r[label_column].strip() for r in rows]


def read_text_query(path: str | Path, text_column: str = "text") -> tuple[list[str], list[dict[str, str]]]:
    """Query utterances from a ``.csv`` (its ``text_column``) or a plain text file (one per line, blank lines
    skipped): ``(texts, rows)`` where ``rows`` are the CSV rows (empty dicts for a text file)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        header, rows, lines = read_rows(path)
        _column(path, header, text_column, "--text-column", "the utterances")
        empty = [n for r, n in zip(rows, lines) if not r[text_column].strip()]
        if empty:
            raise UserError(f"{path}: empty text on line(s) {_first(empty)}")
        return [r[text_column].strip() for r in rows], rows
    if not path.is_file():
        raise UserError(f"query file not found: {path}")
    check_count(f"the size of {path} (bytes)", path.stat().st_size, MAX_TABLE_BYTES)  # read whole, as a CSV is
    try:
        texts = [t.strip() for t in path.read_text(encoding="utf-8-sig").splitlines() if t.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {path} as UTF-8 text ({e}); pass a text file with one utterance per "
                        "line, or a CSV with a text column") from None
    if not texts:
        raise UserError(f"{path} holds no utterances; put one per line")
    return texts, [{} for _ in texts]


__all__ = ["encode_texts", "read_text_support", "read_text_query"]
