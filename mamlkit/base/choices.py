"""The named choices that more than one part accepts, and the one check of them.

The config checks its fields on construction (so the CLI exits 2 before building anything) and the
executor and the algorithm driver check the same names when called from Python; both ask here, so a
name and its message exist once.
"""

from __future__ import annotations

from collections.abc import Sequence

STRATEGIES = ("auto", "vmap", "loop", "threads", "compile")  # how tasks run (mamlkit.exec.executor)
BN_MODES = ("transductive", "support")  # which statistics batch norm uses for queries (mamlkit.engine.norms)


def bad_choice(field: str, value: object, options: Sequence[str]) -> str | None:
    """None when ``value`` is one of ``options``, else the message that names them."""
    if value in options:
        return None
    names = ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]
    return f"{field} must be {names}, got {value!r}"


def check_choice(field: str, value: object, options: Sequence[str]) -> None:
    """Raise ``ValueError`` with :func:`bad_choice`'s message when ``value`` is not one of ``options``."""
    msg = bad_choice(field, value, options)
    if msg is not None:
        raise ValueError(msg)
