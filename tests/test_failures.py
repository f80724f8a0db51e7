"""Every failure a message: a full disk on every write path (exit 1, nothing half-written, the previous files
intact), a link in the place of a run folder's lock (exit 2, the link's target untouched), images that declare
too many pixels, class folders whose names are not UTF-8 or that cannot be read.

A real full disk is a tiny tmpfs, filled to the last byte (skipped where this process cannot mount one);
the others simulate it in-process, as the operating system and safetensors report it."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import config_flags as flags
from PIL import Image
from safetensors import SafetensorError

from mamlkit import checkpoint
from mamlkit.loop import train
from mamlkit.presets import preset_config

SMALL = dict(iterations=12, log_every=2, val_every=6, val_tasks=4, checkpoint_every=100, progress=False,
             tensorboard=False, hidden_sizes=(8, 8), meta_batch=4, eval_tasks=10, eval_query=10,
             eval_steps=(0, 1, 2), eval_shots=(5,), test_inner_steps=2, strategy="vmap", threads=1)
NO_BASELINE = ("--no-compare-pretrained",)
RL_TINY = ["--hidden-sizes", "8", "--meta-batch", "3", "--traj-per-task", "4", "--horizon", "10", "--eval-tasks",
           "4", "--eval-traj", "3", "--pretrain-iterations", "1", "--no-progress", "--no-baselines"]
# what safetensors raises when the disk fills during its write (its Rust writer wraps the OS error as text)
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of atomic writes, and empty files, anywhere below ``folder``."""
    return [p for p in Path(folder).rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.stat().st_size == 0)
            and p.name != ".lock"]


def assert_full_disk_message(code: int, err: str) -> None:
    assert code == 1, err
    assert "no space left on the device" in err.lower(), err
    assert "Traceback" not in err and "Exception in thread" not in err, err


@pytest.fixture
def small_run(tmp_path):
    """A trained sinusoid run (2 iterations) in ``tmp_path/run``."""
    run = tmp_path / "run"
    cfg = preset_config("sinusoid", {**SMALL, "iterations": 2, "val_tasks": 0, "out_dir": str(tmp_path)})
    train.fit(train.new_trainer(cfg, run))
    return run


# --------------------------------------------------------------------------------------
# A real full disk: a tmpfs of a few pages, filled


class Disk:
    """A mounted tmpfs; :meth:`fill` takes its last free byte."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = 0

    def fill(self) -> None:
        self.filler += 1
        fd = os.open(self.path / f".filler{self.filler}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)


def _mount(path: Path, size: str) -> Disk:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk: {done.stderr.strip()}")
    return Disk(path)


@pytest.fixture
def disk(tmp_path):
    """A mounter of tiny tmpfs disks (``disk(path)``), unmounted at the test's end."""
    mounted = []

    def mount(path: Path, size: str = "2m") -> Disk:
        mounted.append(_mount(path, size))
        return mounted[-1]

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d.path)], capture_output=True, timeout=30)


# --------------------------------------------------------------------------------------
# Full disk: checkpoints


def test_checkpoint_write_failing_as_safetensors_reports_it_keeps_the_previous_one(cli, tmp_path, monkeypatch):
    real, calls = checkpoint.save_file, []

    def save_then_fill(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError(SAFETENSORS_FULL)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fill)
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r",
                       *flags({**SMALL, "checkpoint_every": 4}))
    assert_full_disk_message(code, err)
    run = tmp_path / "r"
    assert "step 4" in err and f"mamlkit train --resume {run}" in err, err
    assert checkpoint.load(run)[1]["step"] == 4
    assert not leftovers(run)


def test_checkpoint_on_a_real_full_disk_keeps_the_previous_one(cli, tmp_path, monkeypatch, disk):
    d = disk(tmp_path / "disk")
    real, calls = checkpoint.save_file, []

    def fill_then_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            d.fill()
        real(tensors, path, metadata=metadata)  # safetensors' own writer meets the full disk

    monkeypatch.setattr(checkpoint, "save_file", fill_then_save)
    code, _, err = cli("train", "sinusoid", "--out-dir", d.path, "--run-name", "r",
                       *flags({**SMALL, "checkpoint_every": 4}))
    assert_full_disk_message(code, err)
    run = d.path / "r"
    assert "step 4" in err and f"mamlkit train --resume {run}" in err, err
    assert checkpoint.load(run)[1]["step"] == 4
    assert not leftovers(run)


def test_a_fresh_run_whose_lock_cannot_be_written_exits_1(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", no_space)  # the PID written into RUN/.lock
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", *flags(SMALL))
    assert_full_disk_message(code, err)
    assert ".lock" in err, err
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_a_fresh_run_on_a_real_full_disk_exits_1(cli, tmp_path, disk):
    d = disk(tmp_path / "disk")
    d.fill()
    code, _, err = cli("train", "sinusoid", "--out-dir", d.path, "--run-name", "r", *flags(SMALL))
    assert_full_disk_message(code, err)
    assert not leftovers(d.path / "r")


# --------------------------------------------------------------------------------------
# Full disk: reports, eval --out, adapt --output, caches, TensorBoard, rl train


def test_report_figures_on_a_full_disk_keep_the_run_and_say_how_to_report(cli, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def half_a_figure(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG\r\n")  # a start, then the disk is full
        no_space()

    monkeypatch.setattr(Figure, "savefig", half_a_figure)
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", *NO_BASELINE, *flags(SMALL))
    assert_full_disk_message(code, err)
    run = tmp_path / "r"
    assert f"mamlkit eval {run} --overwrite" in err, err
    assert checkpoint.load(run)[1]["step"] == SMALL["iterations"]
    assert not list(run.glob("*.png")) and not leftovers(run)
    monkeypatch.undo()
    code, _, err = cli("eval", run, "--overwrite")  # the command the message gives
    assert code == 0, err
    assert (run / "figure2_fits.png").stat().st_size > 1000


def test_eval_out_on_a_real_full_disk_exits_1_and_leaves_nothing(cli, tmp_path, small_run, disk):
    d = disk(tmp_path / "disk")
    (d.path / "out").mkdir()
    d.fill()
    code, _, err = cli("eval", small_run, "--out", d.path / "out")
    assert_full_disk_message(code, err)
    assert not list((d.path / "out").iterdir())


def _adapt_inputs(folder: Path) -> tuple[Path, Path]:
    (folder / "support.csv").write_text("x,y\n" + "".join(f"{x},{np.sin(x):.6f}\n" for x in np.linspace(-3, 3, 5)))
    (folder / "query.csv").write_text("x\n0.5\n1.5\n")
    return folder / "support.csv", folder / "query.csv"


@pytest.mark.parametrize("name", ["p.csv", "p.json"])
def test_adapt_output_on_a_full_disk_leaves_no_file(cli, tmp_path, small_run, monkeypatch, name):
    support, query = _adapt_inputs(tmp_path)
    real_write_text = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        real_write_text(self, "", *args, **kwargs)  # the file is made, then nothing more fits
        no_space()

    monkeypatch.setattr(Path, "write_text", half_then_full)
    out = tmp_path / name
    code, _, err = cli("adapt", small_run, "--support", support, "--query", query, "--output", out)
    assert_full_disk_message(code, err)
    assert name in err and not out.exists() and not leftovers(tmp_path)


def test_adapt_output_on_a_real_full_disk_leaves_no_file(cli, tmp_path, small_run, disk):
    support, query = _adapt_inputs(tmp_path)
    d = disk(tmp_path / "disk")
    d.fill()
    code, _, err = cli("adapt", small_run, "--support", support, "--query", query, "--output", d.path / "p.csv")
    assert_full_disk_message(code, err)
    assert not (d.path / "p.csv").exists() and not leftovers(d.path)


def test_example_on_a_real_full_disk_leaves_no_half_copied_folder(cli, tmp_path, disk):
    d = disk(tmp_path / "disk", size="64k")
    d.fill()
    code, _, err = cli("example", "csv", d.path / "ex")
    assert_full_disk_message(code, err)
    assert not (d.path / "ex").exists() and [p.name for p in d.path.iterdir()] == [".filler1"]
    code, _, err = cli("example", "csv", tmp_path / "ex")  # with room, the whole example
    assert code == 0, err
    assert (tmp_path / "ex" / "stores.csv").stat().st_size > 1000


def image_folder(root: Path, classes: int = 12, per_class: int = 3, names: dict[int, bytes] | None = None) -> Path:
    """``root/<class>/<i>.png``: constant-colour images, one colour per class; ``names`` gives some classes
    folder names as bytes (any bytes the file system takes)."""
    names = names or {}
    for c in range(classes):
        folder = os.path.join(bytes(root), names.get(c, b"class%02d" % c))
        os.makedirs(folder)
        colour = np.array([(c * 37) % 256, (c * 91 + 50) % 256, (c * 13 + 100) % 256], dtype=np.uint8)
        for i in range(per_class):
            Image.fromarray(np.broadcast_to(colour, (12 + i, 12, 3)).copy()).save(os.path.join(folder, b"%d.png" % i))
    return root


IMAGES = ["--image-size", "16", "--filters", "2", "--iterations", "2", "--k-query", "2", "--inner-steps", "1",
          "--test-inner-steps", "1", "--meta-batch", "2", "--eval-tasks", "4", "--val-tasks", "0", "--strategy", "loop",
          "--n-way", "2", "--task-split", "0.5", "0.25", "0.25", "--threads", "1", "--no-progress", "--no-tensorboard"]


def test_image_cache_on_a_full_disk_is_a_note_and_training_goes_on(cli, tmp_path, monkeypatch, disk, caplog):
    d = disk(tmp_path / "cache")
    d.fill()
    monkeypatch.setenv("MAMLKIT_CACHE", str(d.path))
    root = image_folder(tmp_path / f"imgs-{uuid.uuid4().hex[:8]}")  # a new folder: never one read before
    with caplog.at_level("WARNING", logger="mamlkit"):
        code, _, err = cli("train", "images", "--path", root, "--out-dir", tmp_path / "runs", *IMAGES)
    assert code == 0, err
    assert "could not write the cache" in caplog.text and "preprocessed again next time" in caplog.text
    assert "Traceback" not in err and not leftovers(d.path)


def test_image_cache_failing_as_safetensors_reports_it_is_a_note(cli, tmp_path, monkeypatch, caplog):
    from safetensors import torch as st

    def full(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_FULL)

    monkeypatch.setattr(st, "save_file", full)  # what the caches' writer calls
    root = image_folder(tmp_path / f"imgs-{uuid.uuid4().hex[:8]}")
    with caplog.at_level("WARNING", logger="mamlkit"):
        code, _, err = cli("train", "images", "--path", root, "--out-dir", tmp_path / "runs", *IMAGES)
    assert code == 0, err
    assert "could not write the cache" in caplog.text and "No space left on device" in caplog.text


def test_tensorboard_on_a_real_full_disk_exits_1_without_a_thread_traceback(cli, tmp_path, disk):
    run = tmp_path / "r"
    d = disk(run / "tensorboard")  # the run's other files have room; TensorBoard's events do not
    d.fill()
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", *NO_BASELINE,
                       *flags({**SMALL, "tensorboard": True, "checkpoint_every": 4}))
    assert_full_disk_message(code, err)
    assert str(run / "tensorboard") in err and "training stopped" in err, err


def test_rl_train_on_a_full_disk_exits_1_naming_the_checkpoint(cli, tmp_path, monkeypatch):
    real, calls = checkpoint.save_file, []

    def save_then_fill(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 10)
            raise SafetensorError(SAFETENSORS_FULL)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fill)
    code, _, err = cli("rl", "train", "nav2d", "--iterations", "3", "--checkpoint-every", "1", "--val-every", "0",
                       "--out-dir", tmp_path, "--run-name", "r", *RL_TINY)
    assert_full_disk_message(code, err)
    run = tmp_path / "r"
    assert "step 1" in err and f"mamlkit rl train --resume {run}" in err, err
    assert checkpoint.load(run)[1]["step"] == 1
    assert not leftovers(run)


# --------------------------------------------------------------------------------------
# The run folder's lock: never written through a link


@pytest.mark.parametrize("how", ["fresh", "resume", "rl-resume", "hard-link"])
def test_a_link_in_the_place_of_the_lock_is_refused_and_its_target_untouched(cli, tmp_path, small_run, how):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n" * 3)
    if how == "rl-resume":
        code, _, err = cli("rl", "train", "nav2d", "--iterations", "1", "--out-dir", tmp_path, "--run-name", "rl",
                           *RL_TINY)
        assert code == 0, err
        run = tmp_path / "rl"
    else:
        run = small_run if how in ("resume", "hard-link") else tmp_path / "fresh"
        run.mkdir(exist_ok=True)
    (run / ".lock").unlink(missing_ok=True)
    if how == "hard-link":
        os.link(victim, run / ".lock")
    else:
        (run / ".lock").symlink_to(victim)
    if how == "fresh":
        args = ("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "fresh", *flags(SMALL))
    elif how == "rl-resume":
        args = ("rl", "train", "--resume", run, "--iterations", "2", *RL_TINY[-2:])
    else:
        args = ("train", "--resume", run, "--iterations", "3", *NO_BASELINE)
    code, _, err = cli(*args)
    assert code == 2, err
    assert str(run / ".lock") in err and ("symbolic link" in err or "hard link" in err), err
    assert "Traceback" not in err
    assert victim.read_text() == "precious\n" * 3


def test_a_lock_file_that_holds_something_else_is_not_overwritten(cli, tmp_path, small_run):
    (small_run / ".lock").write_text("notes that are not a PID\n")
    code, _, err = cli("train", "--resume", small_run, "--iterations", "3", *NO_BASELINE)
    assert code == 2 and "something other than a process ID" in err, err
    assert (small_run / ".lock").read_text() == "notes that are not a PID\n"


def test_a_lock_of_a_previous_run_is_rewritten_with_this_pid(tmp_path):
    from mamlkit import runfolder

    (tmp_path / ".lock").write_text("123456789\n")  # a previous owner's longer PID
    with runfolder.lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


# --------------------------------------------------------------------------------------
# Images that declare too many pixels


def png_header_only(width: int, height: int, mode: int = 0) -> bytes:
    """A PNG that declares ``width × height`` (grey, 8 bits) but holds a few bytes of pixels: opening it reads
    the size from its header; decoding it would need width·height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def omniglot_zips(folder: Path, bomb: bytes) -> Path:
    """Zips in the official layout (964 + 659 characters of 20 drawings), every drawing a 2×2 PNG but the
    first, which is ``bomb``."""
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("L", (2, 2), 255).save(buf, format="PNG")
    small = buf.getvalue()
    for top, characters in (("images_background", 964), ("images_evaluation", 659)):
        with zipfile.ZipFile(folder / f"{top}.zip", "w", zipfile.ZIP_STORED) as zf:
            for c in range(characters):
                for d in range(20):
                    first = top == "images_background" and c == 0 and d == 0
                    zf.writestr(f"{top}/Alpha/character{c:04d}/{d:02d}.png", bomb if first else small)
    return folder


@pytest.mark.parametrize("bomb, message", [
    (png_header_only(20000, 20000), "too large to read"),  # Pillow's DecompressionBombError
    (png_header_only(10000, 9000), "90,000,000 pixels"),  # Pillow would decode it
    (png_header_only(8, 1) + b"\0" * (2 << 20), "2,097,"),  # a valid PNG padded to 2 MB: no Omniglot drawing
], ids=["400M-pixels", "90M-pixels", "2MB-member"])
def test_a_decompression_bomb_in_an_omniglot_zip_exits_2_naming_it(cli, tmp_path, bomb, message):
    omniglot_zips(tmp_path / "data" / "omniglot", bomb)
    code, _, err = cli("data", "omniglot", "--data-root", tmp_path / "data", "--trust-checksum", "--no-download")
    assert code == 2, err
    assert "images_background/Alpha/character0000/00.png" in err and "images_background.zip" in err, err
    assert message in err and "download it again" in err and "Traceback" not in err, err


def test_an_image_of_too_many_pixels_for_pillow_to_refuse_is_refused_before_decoding(tmp_path):
    from mamlkit.base.errors import UserError
    from mamlkit.use import io as mio

    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(10000, 9000))  # 90 million pixels: Pillow only warns, then decodes
    with pytest.raises(UserError, match=r"big\.png is 10000x9000 = 90,000,000 pixels"):
        mio.load_image(big, {"size": 28, "mode": "L"}, set())


def test_a_decompression_bomb_in_mini_imagenet_exits_2_naming_it(tmp_path):
    from mamlkit.base.errors import UserError
    from mamlkit.tasks import miniimagenet

    folder = tmp_path / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.jpg").write_bytes(png_header_only(20000, 20000))
    Image.new("RGB", (4, 4)).save(folder / "images" / "b.jpg", format="PNG")
    (folder / "train.csv").write_text("filename,label\na.jpg,n01\nb.jpg,n02\n")
    with pytest.raises(UserError, match=r"a\.jpg"):
        miniimagenet.load_split(folder, "train", size=8, progress=False)


def test_an_image_folder_skips_too_large_images_with_a_note(tmp_path):
    from mamlkit.tasks import images

    root = image_folder(tmp_path / f"imgs-{uuid.uuid4().hex[:8]}", classes=3)
    (root / "class00" / "huge.png").write_bytes(png_header_only(10000, 9000))
    data = images.load_folder(root, size=8, channels=1, progress=False)
    assert data.counts == (3, 3, 3)
    assert any("more than 89,478,485 pixels" in n and "huge.png" in n for n in data.notes), data.notes


# --------------------------------------------------------------------------------------
# Class folders: names that are not UTF-8, folders that cannot be read


def test_a_class_folder_whose_name_is_not_utf8_trains(cli, tmp_path):
    from mamlkit.tasks import images

    root = image_folder(tmp_path / f"imgs-{uuid.uuid4().hex[:8]}", names={3: b"caf\xe9"})  # Latin-1 "café"
    code, out, err = cli("train", "images", "--path", root, "--out-dir", tmp_path / "runs", *IMAGES)
    assert code == 0, err
    assert "Traceback" not in err and "12 classes split 6/3/3" in out
    layout, classes, _ = images.list_classes(root)
    assert "caf\\xe9" in classes and len(classes) == 12  # the label is text: its byte escaped


def test_an_unreadable_image_folder_exits_2_naming_it(cli, tmp_path, monkeypatch):
    root = image_folder(tmp_path / f"imgs-{uuid.uuid4().hex[:8]}", classes=4)
    scandir = os.scandir

    def denied(path="."):
        if os.fspath(path) == str(root):
            raise PermissionError(errno.EACCES, "Permission denied", str(root))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    code, _, err = cli("train", "images", "--path", root, "--out-dir", tmp_path / "runs", *IMAGES)
    assert code == 2 and f"cannot read the image folder {root} (Permission denied)" in err, err


def test_an_unreadable_class_folder_is_named_in_a_note(tmp_path, monkeypatch):
    from mamlkit.tasks import images

    root = image_folder(tmp_path / f"imgs-{uuid.uuid4().hex[:8]}", classes=4)
    locked = str(root / "class02")
    scandir = os.scandir

    def denied(path="."):
        if os.fspath(path) == locked:  # as chmod 000 does for anyone but root
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    data = images.load_folder(root, size=8, channels=1, progress=False)
    assert data.names == ("class00", "class01", "class03")
    assert any("cannot be read" in n and "class02 (Permission denied)" in n for n in data.notes), data.notes
