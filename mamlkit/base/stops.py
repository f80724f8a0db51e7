"""Stop points: places in long loops (each inner step, each chunk of evaluation tasks) where a pending stop
signal may end the work, raised synchronously at a clean point of the Python code.

A signal handler must not raise inside torch's own code (a torch function mode's bookkeeping cut in two
leaves its stack broken), so the trainer defers a stop to the end of a meta-iteration. Validation runs
inside that deferred block, and evaluation can be as long as training: they would ignore a stop for as long
as they run. Code that is safe to end at a stop point runs under :func:`stoppable`, with the check of the
one who handles signals (:meth:`mamlkit.runfolder.Signals.check`); :func:`stop_point` calls it. Outside
such a block a stop point does nothing, so the math (:mod:`mamlkit.engine`) never knows about signals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_checks: list[Callable[[], None]] = []


def stop_point() -> None:
    """Raise the pending stop, if any, of the innermost :func:`stoppable` block. In a worker thread of the
    threads strategy the exception ends its task and reaches the caller through the task's future."""
    if _checks:
        _checks[-1]()


@contextlib.contextmanager
def stoppable(check: Callable[[], None]) -> Iterator[None]:
    """A block whose stop points call ``check`` (which raises to stop)."""
    _checks.append(check)
    try:
        yield
    finally:
        _checks.pop()


__all__ = ["stop_point", "stoppable"]
