"""A run folder's safety, shared by the supervised and the meta-RL trainers.

* One writer at a time: :func:`lock` takes an OS lock (``fcntl.flock``) on ``RUN/.lock`` holding the
  owner's PID. The kernel drops it when the process dies, however it dies, so a killed run never
  leaves a lock that blocks its resume. A link in the lock's place is refused, never written through.
* Leftovers of a killed run: :func:`clean` removes the temporary files of atomic writes cut short.
* Logs that match the checkpoint: :func:`truncate_metrics` cuts ``metrics.jsonl`` back to the
  checkpoint's step (dropping a torn last line) and rebuilds ``metrics.csv`` from it, header first.
* Stop signals: :func:`stop_on_signals` turns SIGINT and SIGTERM into :class:`Stopped`, raised at
  once or, inside :meth:`Signals.deferred`, when the block ends, so an update is never half applied;
  inside :meth:`Signals.interruptible` (validation, evaluation) also at the next stop point.
* What a run writes: one registry of the names a run may write (:func:`register_run_files`: the trainers'
  files here, the reports' where they are written), and in every run folder a manifest
  (:data:`MANIFEST`) of what its run wrote, recorded before each write; ``--overwrite`` removes exactly
  those (:func:`clear`), and the closing line names only them (:func:`written`).
* A full disk: :func:`no_space` tells an out-of-space ``OSError`` (or safetensors' error wrapping one)
  apart, so the commands can stop with a message instead of a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mamlkit.base.errors import DiskFull, UserError
from mamlkit.base.metrics import CSV_COLUMNS, read_jsonl
from mamlkit.base.stops import stoppable
from mamlkit.checkpoint import NO_SPACE, atomic_write_text, os_error_of

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_NAME = ".lock"
# The run's record of the files it wrote (names relative to the run folder, a folder's with a trailing "/").
MANIFEST = ".run_files.json"


class RunFolderBusy(UserError):
    """Another live process holds the run folder's lock."""


def no_space(e: BaseException) -> bool:
    """Whether ``e`` is the operating system saying the disk (or the user's quota) is full, also as
    safetensors' ``SafetensorError`` wraps it."""
    err = os_error_of(e)
    return err is not None and err.errno in NO_SPACE


def disk_full_message(e: BaseException) -> str:
    """What ran out of space, for a message: "no space left on the device while writing FILE"."""
    err = os_error_of(e)
    name = getattr(err, "filename", None) or getattr(e, "filename", None)
    return f"no space left on the device while writing {name or 'a file'} ({getattr(err, 'strerror', e)})"


_held: dict[str, list] = {}  # resolved folder -> [fd, depth]: the lock is re-entrant within a process


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; raises :class:`RunFolderBusy` (naming the folder and the
    holder's PID) at once if another process holds it. Re-entrant within one process."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if fcntl is None or key in _held:
        if key in _held:
            _held[key][1] += 1
        try:
            yield
        finally:
            if key in _held:
                _held[key][1] -= 1
        return
    fd = _open_lock(run_dir / LOCK_NAME)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusy(f"run folder {run_dir} is in use by another mamlkit process (PID {holder}); wait for "
                            "it to finish or stop it, or pick another folder with --run-name or --out-dir") from None
    try:
        _write_pid(fd, run_dir / LOCK_NAME)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            os.close(fd)  # closing the descriptor releases the flock


def holds(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s lock (:func:`lock`): a caller that took it for a whole run
    (:mod:`mamlkit.loop.run`) is not asked for it again by the steps it runs."""
    return str(Path(run_dir).resolve()) in _held


_PID_TEXT = re.compile(rb"\s*\d*\s*")  # what a lock file holds: its owner's PID, or nothing yet


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path``, made if missing. A link there is refused, never followed:
    ``O_NOFOLLOW`` for a symbolic link (the PID written next would replace whatever file it points to), and
    a second hard link, or anything but a regular file, after the open. Raises :class:`UserError`."""
    fix = "remove it and run the command again: mamlkit makes its own lock file there"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if os.path.islink(path):  # ELOOP from O_NOFOLLOW
            raise UserError(f"the run folder's lock file {path} is a symbolic link (to {os.readlink(path)}); "
                            f"mamlkit never writes through a link: {fix}") from None
        if no_space(e):
            raise
        raise UserError(f"cannot open the run folder's lock file {path} ({e.strerror}): {fix}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"one of {st.st_nlink} hard links to a file"
        raise UserError(f"the run folder's lock file {path} is {what}; mamlkit never writes into a file it may share "
                        f"with another path: {fix}")
    return fd


def _write_pid(fd: int, path: Path) -> None:
    """Record this process's PID in the lock file it holds. Only a file that holds a PID or nothing (one a
    mamlkit process made) is rewritten: the file's content is never cut short otherwise."""
    old = os.pread(fd, 64, 0)
    if len(old) > 32 or not _PID_TEXT.fullmatch(old):
        raise UserError(f"the run folder's lock file {path} holds something other than a process ID; mamlkit does "
                        f"not overwrite it: move it away (`mv {path} ...`) and run the command again")
    pid = f"{os.getpid()}\n".encode()
    try:
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))  # a longer PID of a previous owner is cut to this one's
    except OSError as e:  # a full disk: name the file
        raise OSError(e.errno, e.strerror, str(path)) from None


def clean(run_dir: Path) -> list[Path]:
    """Remove the temporary files that atomic writes cut short by a kill left in ``run_dir``; call it
    holding the lock (no other writer can be mid-write then). Returns what was removed."""
    removed = []
    for p in Path(run_dir).glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# What a run leaves that a fresh run would replace and could not rebuild: what it trained and reported.
RESULTS = ("checkpoint.safetensors", "best.safetensors", "pretrained/checkpoint.safetensors", "eval.md", "eval.json")


def results_in(run_dir: Path) -> list[str]:
    """The files of :data:`RESULTS` that ``run_dir`` holds. A config and logs without a checkpoint are what a
    run that stopped before its first checkpoint leaves (data missing, a stop during preprocessing or the
    strategy trial): nothing was trained, there is nothing to resume, and a fresh run may use the folder."""
    return [name for name in RESULTS if (Path(run_dir) / name).exists()]


# Every name a run may write into its folder, in the order the closing line names them -> whether it names it
# there (a nested run's folder is not: it names its own files). The trainers' own are declared here; what
# evaluation writes, by the module that writes it (mamlkit.eval.reports, mamlkit.rl.evaluate).
_REGISTRY: dict[str, bool] = {}
_MAX_MANIFEST_BYTES = 1 << 16  # a few dozen names; a manifest longer than this is not one mamlkit wrote


def register_run_files(*names: str, listed: bool = True) -> None:
    """Declare ``names`` (files in a run folder; a folder as ``name/``) as what a run may write there, so that
    :func:`record` accepts them and :func:`clear` removes them from folders written before manifests.
    ``listed=False``: not named in a run's closing line (a nested run's folder). The first declaration holds."""
    for name in names:
        if not _plain_name(name):
            raise ValueError(f"{name!r} is not a file or folder name of a run folder")
        _REGISTRY.setdefault(name, listed)


def _plain_name(name: object) -> bool:
    """A name of one entry directly in a run folder (``name`` or ``name/``), never hidden (the lock, the
    manifest), never a path: a manifest can name nothing outside its run's files."""
    if not isinstance(name, str):
        return False
    bare = name.removesuffix("/")
    return 0 < len(bare) <= 255 and not bare.startswith(".") and "/" not in bare and "\\" not in bare \
        and "\0" not in bare


# the trainers' own: checkpoints, config, logs, TensorBoard's events, and the baseline's run (RUN/pretrained)
register_run_files("checkpoint.safetensors", "best.safetensors", "config.json", "metrics.jsonl", "metrics.csv",
                   "tensorboard/")
register_run_files("pretrained/", listed=False)


def _manifest(run_dir: Path) -> list[str] | None:
    """The names ``run_dir``'s manifest records; None if it has none (a folder written before manifests) or
    one that is unreadable (then the registered names stand in, as for such a folder)."""
    path = run_dir / MANIFEST
    try:
        if path.is_symlink() or path.stat().st_size > _MAX_MANIFEST_BYTES:
            return None
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [n for n in names if _plain_name(n)] if isinstance(names, list) else None


def _present(run_dir: Path, names: list[str]) -> list[str]:
    return [n for n in names if os.path.lexists(run_dir / n.removesuffix("/"))]


def record(run_dir: Path, names: tuple[str, ...] | list[str]) -> None:
    """Add ``names`` (registered: :func:`register_run_files`) to ``run_dir``'s manifest, atomically, before
    they are written: a run killed while writing them still has them recorded. A folder without a manifest
    (written before manifests) starts one with the registered names it holds, which its run wrote."""
    run_dir = Path(run_dir)
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unregistered run files {unknown}: declare them with register_run_files")
    had = _manifest(run_dir)
    have = had if had is not None else _present(run_dir, list(_REGISTRY))
    now = have + [n for n in dict.fromkeys(names) if n not in have]
    if now != had:
        atomic_write_text(run_dir / MANIFEST, json.dumps(now))


def written(run_dir: Path) -> list[str]:
    """The files the run in ``run_dir`` wrote that are there, in the registry's order (a folder's name ends
    in ``/``), the nested runs' folders left out: what a run's closing line names."""
    run_dir = Path(run_dir)
    names = _manifest(run_dir)
    names = _present(run_dir, names if names is not None else list(_REGISTRY))
    order = {n: i for i, n in enumerate(_REGISTRY)}
    return sorted((n for n in names if _REGISTRY.get(n, True)), key=lambda n: order.get(n, len(order)))


def clear(run_dir: Path) -> None:
    """Remove the previous run's files from ``run_dir`` (``--overwrite``): exactly those its manifest names,
    or, in a folder written before manifests, the registered names. Other files stay."""
    run_dir = Path(run_dir)
    names = _manifest(run_dir)
    for name in _present(run_dir, names if names is not None else list(_REGISTRY)):
        path = run_dir / name.removesuffix("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (run_dir / MANIFEST).unlink(missing_ok=True)


def report_folder(out: Path, names: tuple[str, ...], overwrite: bool) -> Path:
    """``out``, checked as where an evaluation writes its report files ``names``: a folder (made if missing)
    that holds none of them yet, unless ``overwrite``. A run's own report is never replaced silently."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder for {', '.join(names[:2])} and the figures")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them, or "
                        "--out DIR to write this evaluation elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Make the logs hold exactly the records of steps ``1..step`` (those of the checkpoint being
    continued; none for a fresh run): a torn last line and records logged after the checkpoint are
    dropped, and ``metrics.csv`` is rebuilt from ``metrics.jsonl``, header first, so a resumed run
    logs every step exactly once in both."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    records = [r for r in read_jsonl(path) if r["step"] <= step] if path.exists() and step else []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def prepare(run_dir: Path, step: int) -> None:
    """Ready a locked run folder to continue from ``step``: leftovers removed, logs cut back to ``step``."""
    clean(run_dir)
    truncate_metrics(run_dir, step)


# --------------------------------------------------------------------------------------
# Stop signals


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """The state of :func:`stop_on_signals`: the signal received (if any) and the deferral depth."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.depth = 0
        self.holding = 0  # depth of held() blocks: there a stop waits for every rank, even at a stop point

    def handler(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            return  # one stop is enough: a second Ctrl-C must not abort the checkpoint being written
        self.received = signum
        if self.depth == 0:
            raise Stopped(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a stop signal must not cut in two (an optimiser update and its bookkeeping): a signal
        received inside it raises :class:`Stopped` when it ends."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.received is not None:
            raise Stopped(self.received)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block in which a stop signal is only recorded (``received``), never raised, not even at its
        end: under torchrun the ranks must leave at the same step, so they stop when they agree to
        (:meth:`mamlkit.loop.distributed.World.backward_and_reduce`), not each when its own signal lands."""
        self.depth += 1
        self.holding += 1
        try:
            yield
        finally:
            self.depth -= 1
            self.holding -= 1

    def check(self) -> None:
        """Raise :class:`Stopped` if a stop signal arrived and is not held for the other ranks."""
        if self.received is not None and not self.holding:
            raise Stopped(self.received)

    def interruptible(self) -> contextlib.AbstractContextManager:
        """A block that a stop signal may end at its stop points (:func:`mamlkit.base.stops.stop_point`: each
        inner step, each chunk of tasks) even inside :meth:`deferred`: validation and evaluation change
        nothing a stop could leave half done, and can run as long as training."""
        return stoppable(self.check)


_NO_SIGNALS = Signals()  # outside stop_on_signals (or off the main thread): deferral is a plain block


def current() -> Signals:
    """The active :class:`Signals` (a no-op one outside :func:`stop_on_signals`)."""
    return _active[-1] if _active else _NO_SIGNALS


_active: list[Signals] = []


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Signals]:
    """Turn SIGINT (Ctrl-C) and SIGTERM (a scheduler's time limit, torchrun stopping its workers) into
    :class:`Stopped`, raised at the next Python bytecode, or at the end of a :meth:`Signals.deferred` block.

    Installed explicitly because a process started in the background by a non-interactive shell
    (``mamlkit train ... &`` in a script) inherits SIGINT *ignored*, and Python then never raises
    KeyboardInterrupt. Signals after the first are ignored, and stay ignored after the block if one
    arrived, so neither a second Ctrl-C during the checkpoint write nor one during interpreter shutdown
    (``atexit`` handlers) prints a traceback.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _NO_SIGNALS
        return
    state = Signals()
    previous = {s: signal.signal(s, state.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _active.append(state)
    try:
        yield state
    finally:
        _active.remove(state)
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if state.received is not None else h)


__all__ = ["lock", "holds", "clean", "results_in", "clear", "register_run_files", "record", "written",
           "truncate_metrics", "prepare", "Stopped", "Signals", "stop_on_signals", "current", "no_space",
           "disk_full_message", "DiskFull", "RunFolderBusy"]
