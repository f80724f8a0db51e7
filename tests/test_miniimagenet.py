"""mini-ImageNet on a tiny generated folder in the Ravi & Larochelle layout (images/ + split CSVs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mamlkit import cli
from mamlkit.data import DataError
from mamlkit.tasks import miniimagenet

torch.set_num_threads(1)

CLASSES = {"train": ["n01", "n02", "n03", "n04", "n05", "n06"], "val": ["n11", "n12", "n13", "n14", "n15"],
           "test": ["n21", "n22", "n23", "n24", "n25"]}
PER_CLASS = 4


@pytest.fixture()
def fixture_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, labels in CLASSES.items():
        rows = ["filename,label"]
        for c, label in enumerate(labels):
            for i in reversed(range(PER_CLASS)):  # CSV order is not file order: the loader sorts
                name = f"{label}{i:08d}.jpg"
                # A constant colour per class, so labels can be checked after resizing.
                colour = np.array([(c * 40) % 256, 255 - c * 30, i * 50], dtype=np.uint8)
                pixels = np.broadcast_to(colour, (90, 100, 3)).copy()
                pixels[:5] = rng.integers(0, 256, (5, 100, 3), dtype=np.uint8)  # a little texture
                Image.fromarray(pixels).save(folder / "images" / name, quality=95)
                rows.append(f"{name},{label}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_load_split_and_cache(fixture_root, monkeypatch):
    folder = fixture_root / "miniimagenet"
    images, labels = miniimagenet.load_split(folder, "train", progress=False)
    assert images.shape == (6, PER_CLASS, 3, 84, 84) and images.dtype == torch.uint8
    assert labels == CLASSES["train"]
    # Class 2, image 3 (file n0300000003): centre pixel keeps its colour through the antialiased resize.
    centre = images[2, 3, :, 60, 42].tolist()
    assert all(abs(a - b) <= 3 for a, b in zip(centre, [80, 195, 150]))
    cache = list((fixture_root / "cache" / "miniimagenet").glob("*train*.safetensors"))
    assert len(cache) == 1
    # Second load comes from the cache: decoding images would fail now.
    monkeypatch.setattr(miniimagenet, "np", None)
    again, _ = miniimagenet.load_split(folder, "train", progress=False)
    assert torch.equal(again, images)
    monkeypatch.undo()
    monkeypatch.setenv("MAMLKIT_CACHE", str(fixture_root / "cache"))
    raw = bytearray(cache[0].read_bytes())
    raw[-100] ^= 0xFF
    cache[0].write_bytes(bytes(raw))
    rebuilt, _ = miniimagenet.load_split(folder, "train", progress=False)
    assert torch.equal(rebuilt, images)


def test_bad_folders_are_clear_errors(fixture_root):
    folder = fixture_root / "miniimagenet"
    with pytest.raises(DataError, match="train.csv"):
        miniimagenet.load_split(fixture_root / "nowhere", "train")
    (folder / "images" / "n2100000001.jpg").unlink()
    with pytest.raises(DataError, match="n2100000001.jpg.*missing"):
        miniimagenet.load_split(folder, "test", progress=False)
    (folder / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(DataError, match="filename,label"):
        miniimagenet.load_split(folder, "val", progress=False)


def test_cli_train_miniimagenet_fixture(fixture_root, tmp_path, capsys):
    args = ["train", "miniimagenet-5w1s", "--iterations", "2", "--data-root", str(fixture_root),
            "--k-query", "2", "--inner-steps", "1", "--test-inner-steps", "2", "--filters", "4",
            "--eval-tasks", "6", "--val-tasks", "2",
            "--out-dir", str(tmp_path / "runs"), "--threads", "1", "--no-progress", "--no-tensorboard"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "48.70 ± 1.84" in out and "transductive" in out
    run = tmp_path / "runs" / "miniimagenet-5w1s-maml"
    result = json.loads((run / "eval.json").read_text())
    assert sorted(result["accuracy"]["maml"]) == ["0", "1", "2"] and result["num_tasks"] == 6
    # The last line names the files the run wrote, and no others: the accuracy curve, no TensorBoard.
    assert (run / "accuracy_curve.png").stat().st_size > 1000
    last = out.strip().splitlines()[-1]
    assert last == (f"run folder: {run} (checkpoint.safetensors, config.json, metrics.jsonl, metrics.csv, eval.md, "
                    "eval.json, accuracy_curve.png)"), last
    # 16 query images per class exceed the 4 images per class of the fixture: a clear error, exit 2.
    assert cli.main(args[:-2] + ["--k-query", "16", "--run-name", "x"]) == 2
    assert "exceed" in capsys.readouterr().err
