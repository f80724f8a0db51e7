"""`mamlkit train images`: any folder of labelled images, on small folders generated here (never real data)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mamlkit.base.errors import UserError
from mamlkit.config import TrainConfig
from mamlkit.models import build_model
from mamlkit.tasks import images
from mamlkit.use.io import load_image

ROOT = Path(__file__).resolve().parents[1]


def colour(c: int) -> np.ndarray:
    """Class ``c``'s constant RGB colour."""
    return np.array([(c * 37) % 256, (c * 91 + 50) % 256, (c * 13 + 100) % 256], dtype=np.uint8)


def make_folder(root: Path, classes: int = 12, per_class: int = 4, prefix: str = "class") -> Path:
    """``root/<prefix>NN/<i>.png``: constant-colour images of a few sizes."""
    for c in range(classes):
        d = root / f"{prefix}{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.broadcast_to(colour(c), (20 + i, 24, 3)).copy()).save(d / f"{i}.png")
    return root


def config(path: Path, **kw) -> TrainConfig:
    values = dict(task="images", loss="cross_entropy", model="conv4", path=str(path), image_size=8, channels=3,
                  n_way=2, k_shot=1, k_query=1, filters=4, pool=True)
    return TrainConfig(**{**values, **kw})


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pixels_modes_sizes_and_unreadable_files(tmp_path, own_cache):
    root = tmp_path / "data"
    for c, mode in enumerate(("RGB", "L", "RGBA", "P")):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(3):
            im = Image.fromarray(np.broadcast_to(colour(c), (10 + 7 * i, 30, 3)).copy())
            im = im.quantize(8) if mode == "P" else im.convert(mode)
            im.save(d / f"{i}.png")
    (root / "c1" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "c2" / "empty.jpg").write_bytes(b"")
    (root / "c3" / "notes.txt").write_text("not an image, not read")
    data = images.load_folder(root, size=8, channels=3, progress=False)
    assert data.layout == "class folders (ImageFolder)" and data.names == ("c0", "c1", "c2", "c3")
    assert data.counts == (3, 3, 3, 3) and data.images.shape == (12, 3, 8, 8) and data.images.dtype == torch.uint8
    notes = " | ".join(data.notes)
    assert "skipped 2 file(s) that do not decode" in notes and "broken.png" in notes and "empty.jpg" in notes
    assert "converted 9 image(s) from L, P, RGBA to RGB" in notes and "3 different sizes" in notes
    for c in (0, 2):  # RGB and RGBA keep the class's colour through the resize
        want = torch.tensor(colour(c).astype(int))[:, None, None]
        assert (data.images[3 * c:3 * c + 3].int() - want).abs().max() <= 1
    # the very numbers `mamlkit adapt` feeds the model for the same files, for both channel counts
    for channels, mode in ((3, "RGB"), (1, "L")):
        data = images.load_folder(root, size=8, channels=channels, progress=False)
        spec = images.input_spec(config(root, channels=channels))
        assert spec["mode"] == mode
        for k, f in enumerate(sorted((root / "c3").glob("*.png"))):
            x = data.images[9 + k].to(torch.float32).mul_(1 / 255)
            assert torch.equal(x, load_image(f, spec, set()))


def test_cache_is_reused_rebuilt_when_the_folder_changes_and_when_corrupt(tmp_path, own_cache, monkeypatch):
    root = make_folder(tmp_path / "data", classes=3, per_class=2)
    first = images.load_folder(root, size=8, progress=False)
    files = list((own_cache / "images").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left behind

    def no_decoding(*a):
        raise AssertionError("decoded an image although the cache holds the folder")

    monkeypatch.setattr(images, "_decode", no_decoding)
    again = images.load_folder(root, size=8, progress=False)
    assert torch.equal(again.images, first.images) and again.counts == first.counts
    monkeypatch.undo()
    monkeypatch.setenv("MAMLKIT_CACHE", str(own_cache))
    Image.fromarray(np.broadcast_to(colour(7), (9, 9, 3)).copy()).save(root / "class01" / "new.png")
    changed = images.load_folder(root, size=8, progress=False)  # a new listing: a new cache
    assert changed.counts == (2, 3, 2) and len(list((own_cache / "images").iterdir())) == 2
    assert torch.equal(changed.images[4], torch.tensor(colour(7))[:, None, None].expand(3, 8, 8))
    for f in (own_cache / "images").iterdir():  # flipped pixel bytes: the digest no longer matches
        raw = bytearray(f.read_bytes())
        raw[-10] ^= 0xFF
        f.write_bytes(bytes(raw))
    assert torch.equal(images.load_folder(root, size=8, progress=False).images, changed.images)


def test_classes_split_by_a_fixed_hash_of_their_names():
    names = [f"species {i}" for i in range(40)]

    def key(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"mamlkit-images-split/1/{name}".encode(), digest_size=8).digest(),
                              "little")

    order = sorted(names, key=key)
    parts = images.split_classes(list(reversed(names)), (0.7, 0.15, 0.15))
    assert parts == {"train": order[:28], "val": order[28:34], "test": order[34:]}
    assert images.split_classes(names, (0.5, 0.25, 0.25))["train"] == order[:20]


def test_episodes_draw_distinct_images_of_classes_of_unequal_sizes():
    counts = torch.tensor([2, 3, 7, 4, 6])
    offsets = torch.cumsum(counts, 0) - counts
    pool = torch.arange(int(counts.sum()), dtype=torch.uint8)[:, None, None, None]  # image j holds the value j
    tasks = images.FolderTasks(pool, offsets, counts, n_way=3, k_shot=1, k_query=1)
    batch = tasks.sample(300, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (300, 3, 1, 1, 1) and batch.query_x.shape == (300, 3, 1, 1, 1)
    assert batch.support_y.tolist()[0] == [0, 1, 2] and torch.equal(batch.query_y, batch.support_y)
    ids = torch.stack([batch.support_x, batch.query_x], -1).reshape(300, 3, 2).mul(255).round().long()
    owner = torch.bucketize(ids, offsets + counts, right=True)  # the class each drawn image belongs to
    assert (owner[..., 0] == owner[..., 1]).all() and (ids[..., 0] != ids[..., 1]).all()
    assert all((owner[t] != owner[t].roll(1, 0)).all() for t in range(300))  # distinct classes in a task
    assert set(ids.flatten().tolist()) == set(range(int(counts.sum())))  # every image of every class is drawn
    again = tasks.sample(300, torch.Generator().manual_seed(0))
    assert torch.equal(again.query_x, batch.query_x)


def test_small_classes_skipped_with_a_count_or_refused(tmp_path, own_cache, caplog):
    root = make_folder(tmp_path / "data", classes=20, per_class=3)
    parts = images.split_classes([f"class{c:02d}" for c in range(20)], (0.7, 0.15, 0.15))
    small = parts["train"][:2]
    for name in small:
        (root / name / "0.png").unlink()
    with caplog.at_level("WARNING", logger="mamlkit"):
        tasks = images.build(config(root, k_shot=1, k_query=2), "train")
    assert len(tasks.counts) == 12 and "skipped 2 train class(es) with fewer than 3 images" in caplog.text
    with pytest.raises(UserError, match=f"2 train class.*fewer than k_shot \\+ k_query = 3 images: {small[0]}"):
        images.build(config(root, k_shot=1, k_query=2, small_classes="error"), "train")
    images.build(config(root, k_shot=1, k_query=1, small_classes="error"), "train")  # 2 images are enough here


def _tree(root: Path, dirs: list[str], per: int = 1, suffix: str = ".png") -> Path:
    for d in dirs:
        (root / d).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / d / f"{i}{suffix}")
    return root


def test_layouts_users_have_are_detected(tmp_path):
    omni = _tree(tmp_path / "o", ["omniglot-py/images_background/Alpha/character01",
                                  "omniglot-py/images_background/Alpha/character02",
                                  "omniglot-py/images_background/Beta/character01",
                                  "omniglot-py/images_evaluation/Gamma/character01"])
    for where in (omni, omni / "omniglot-py"):
        layout, classes, _ = images.list_classes(where)
        assert layout.startswith("torchvision Omniglot (images_background, images_evaluation")
        assert list(classes) == ["Alpha/character01", "Alpha/character02", "Beta/character01", "Gamma/character01"]
    layout, classes, _ = images.list_classes(omni / "omniglot-py" / "images_evaluation")
    assert layout.startswith("torchvision Omniglot (images_evaluation") and list(classes) == ["Gamma/character01"]

    cub = _tree(tmp_path / "cub", ["CUB_200_2011/images/001.Black_footed_Albatross",
                                   "CUB_200_2011/images/002.Laysan_Albatross"], per=2, suffix=".jpg")
    (cub / "CUB_200_2011" / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    for where in (cub, cub / "CUB_200_2011"):
        layout, classes, _ = images.list_classes(where)
        assert layout.startswith("CUB-200-2011") and list(classes) == ["001.Black_footed_Albatross",
                                                                       "002.Laysan_Albatross"]
        assert all(len(f) == 2 for f in classes.values())

    mini = _tree(tmp_path / "mini", ["n01532829", "n01558993"])
    assert images.list_classes(mini)[0] == "mini-ImageNet class folders"
    pooled = _tree(tmp_path / "pooled", ["train/n01532829", "val/n01558993", "test/n01704323", "val/n01532829"])
    layout, classes, _ = images.list_classes(pooled)
    assert layout.startswith("mini-ImageNet class folders in test/train/val (pooled")
    assert {k: len(v) for k, v in classes.items()} == {"n01532829": 2, "n01558993": 1, "n01704323": 1}

    plain = _tree(tmp_path / "plain", ["cats/indoor", "cats/outdoor", "dogs"])
    layout, classes, _ = images.list_classes(plain)
    assert layout == "class folders (ImageFolder)" and {k: len(v) for k, v in classes.items()} == {"cats": 2, "dogs": 1}


def test_symlink_loops_are_read_once_with_a_note(tmp_path, own_cache):
    root = make_folder(tmp_path / "data", classes=3, per_class=2)
    (root / "class00" / "again").symlink_to(root / "class00")   # a loop inside a class
    (root / "class01" / "up").symlink_to(root)                  # back to the top
    (root / "class02" / "self").symlink_to(root / "class02" / "self")  # a link to itself
    (root / "class02" / "gone.png").symlink_to(tmp_path / "missing.png")
    (root / "everything").symlink_to(root)                      # a class folder that is the top itself
    data = images.load_folder(root, size=8, progress=False)
    assert data.names == ("class00", "class01", "class02") and data.counts == (2, 2, 2)
    notes = " | ".join(data.notes)
    assert "reached again through symbolic links once (a loop)" in notes and "class00/again" in notes
    assert "skipped 2 broken link(s)" in notes and "gone.png" in notes


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no class folders with images"),
    ("missing", "image folder not found"),
    ("no path", "pass the folder of labelled images with --path DIR"),
    ("one class", "5-way tasks need 5 classes in train, but the folder's 1 class\\(es\\)"),
    ("loose images", "holds images \\(a.png\\) but no class folders"),
    ("nothing decodes", "no image in .* decodes: skipped 2 file"),
    ("channels", "channels must be 1 \\(grey\\) or 3 \\(RGB\\), got 2"),
    ("other family's flag", "--rotations has no effect on the images task family"),
])
def test_bad_folders_exit_2_with_the_problem_and_the_fix(cli, tmp_path, case, message):
    import re

    root = tmp_path / "data"
    root.mkdir()
    extra = []
    if case == "one class":
        make_folder(root, classes=1)
    elif case == "loose images":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "a.png")
    elif case == "nothing decodes":
        (root / "x").mkdir()
        (root / "x" / "a.png").write_text("no")
        (root / "x" / "b.jpg").write_text("no")
    elif case == "channels":
        extra = ["--channels", "2"]
    elif case == "other family's flag":
        extra = ["--rotations", "none"]
    path = [] if case == "no path" else ["--path", root / "nowhere" if case == "missing" else root]
    code, out, err = cli("train", "images", *path, *extra, "--out-dir", tmp_path / "runs", "--no-progress",
                         "--no-tensorboard", "--threads", "1")
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err


def test_ten_thousand_classes_in_bounded_memory(tmp_path):
    """20,000 images of 64×64 RGB (240 MB decoded) preprocessed to 8×8 grey: the peak RSS grows by the cache
    and the listing, not by the decoded images (Linux: the peak is reset through /proc/self/clear_refs)."""
    root = tmp_path / "data"
    root.mkdir()
    source = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    for c in range(10_000):
        (root / f"{c:05d}").mkdir()
        for i in range(2):
            os.link(source, root / f"{c:05d}" / f"{i}.png")
    script = textwrap.dedent(f"""
        import json
        from mamlkit.tasks import images
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from the current RSS (Linux >= 4.0)
        before = status("VmRSS:")
        data = images.load_folder({str(root)!r}, size=8, channels=1, progress=False)
        after = status("VmHWM:")
        print(json.dumps(dict(classes=len(data.names), images=int(sum(data.counts)), before_kb=before,
                              after_kb=after, cache_bytes=data.images.numel())))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAMLKIT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    print(result)
    assert result["classes"] == 10_000 and result["images"] == 20_000 and result["cache_bytes"] == 20_000 * 64
    assert (result["after_kb"] - result["before_kb"]) < 100 * 1024  # far below the 240 MB of decoded images


def test_train_then_adapt_with_conv4_and_resnet12(cli, tmp_path, caplog):
    root = make_folder(tmp_path / "data", classes=30, per_class=4)
    base = ["train", "images", "--path", root, "--image-size", "16", "--filters", "2", "--iterations", "2",
            "--k-query", "2", "--inner-steps", "1", "--test-inner-steps", "1", "--meta-batch", "2", "--eval-tasks", "4",
            "--val-tasks", "0", "--strategy", "loop", "--out-dir", tmp_path / "runs", "--threads", "1", "--no-progress",
            "--no-tensorboard"]
    with caplog.at_level("WARNING", logger="mamlkit"):
        code, out, err = cli(*base)
    assert code == 0, err
    assert "class folders (ImageFolder) layout, 30 classes, 120 images at 16x16" in caplog.text
    assert ("Layout: class folders (ImageFolder); 30 classes split 21/4/5 (train/val/test) by name; 5 test "
            "classes") in out
    run = tmp_path / "runs" / "images-maml"
    spec = json.loads((run / "config.json").read_text())
    assert spec["task"] == "images" and spec["channels"] == 3 and spec["pool"] is True
    support, query = tmp_path / "support", tmp_path / "query"
    for c, name in ((3, "red"), (5, "blue")):
        (support / name).mkdir(parents=True)
        Image.fromarray(np.broadcast_to(colour(c), (30, 30, 3)).copy()).save(support / name / "a.jpg")
    query.mkdir()
    Image.fromarray(np.broadcast_to(colour(5), (12, 12, 3)).copy()).save(query / "q.png")
    code, out, err = cli("adapt", run, "--support", support, "--query", query)
    assert code == 0, err
    assert out.splitlines()[0] == "file,prediction,p[blue],p[red]" and len(out.splitlines()) == 2

    code, out, err = cli(*base, "--model", "resnet12", "--run-name", "resnet")
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "runs" / "resnet" / "checkpoint.safetensors"), framework="pt") as f:
        assert any("shortcut" in k for k in f.keys())  # the run's weights are ResNet-12's
    code, out, err = cli("adapt", tmp_path / "runs" / "resnet", "--support", support, "--query", query)
    assert code == 0, err


def test_resnet12_spec_and_shapes():
    cfg = config(Path("."), model="resnet12", filters=4, n_way=5, channels=1)
    assert images.model_spec(cfg) == {"name": "resnet12", "in_channels": 1, "out_features": 5, "hidden": 4}
    assert images.model_spec(config(Path(".")))["name"] == "conv4"  # any other --model value: Conv4
    model = build_model(images.model_spec(cfg))
    widths, c, expected = (4, 10, 20, 40), 1, 0
    for w in widths:  # three 3×3 convs and a 1×1 shortcut, no biases; four batch norms of 2·w each
        expected += 9 * c * w + 18 * w * w + c * w + 8 * w
        c = w
    expected += 40 * 5 + 5
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.rand(3, 1, 21, 21)).shape == (3, 5) and hasattr(model, "head")
