"""Omniglot: loader on the real data, checksums and cache, splits, rotations, Conv4 and batch-norm
modes (vmap == loop, finite differences), and a short end-to-end CLI run.

Tests of what only the real zips can show (pixels, pinned splits, the paper's run) read them where
mamlkit looks (``$MAMLKIT_DATA``, else the default data root) and skip when they are absent; the
rest run on generated stand-ins. Never downloads. Preprocessed caches go to a temporary
``$MAMLKIT_CACHE``.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from mamlkit import MAML, cli, data
from mamlkit.data import DataError, KnownFile, verify_file
from mamlkit.engine.inner import make_task_fn, query_objective
from mamlkit.engine.norms import support_stats_objective
from mamlkit.engine.rules import sgd
from mamlkit.models import build_model, conv4
from mamlkit.tasks import TaskBatch, get_family
from mamlkit.tasks.omniglot import OmniglotTasks, rotated, split_indices

torch.set_num_threads(1)



@pytest.fixture(scope="session")
def omniglot(cache_dir, omniglot_dir):
    return data.load_omniglot(omniglot_dir, progress=False)


def linked_copy(tmp_path: Path, source: Path) -> Path:
    """A data root whose ``omniglot/`` holds symlinks to the zips in ``source``."""
    folder = tmp_path / "omniglot"
    folder.mkdir()
    for k in data.OMNIGLOT_FILES:
        (folder / k.name).symlink_to((source / k.name).resolve())
    return tmp_path


def fake_zips(root: Path) -> Path:
    """A data root whose ``omniglot/`` holds two files named as the zips, neither a zip nor a known checksum."""
    folder = root / "omniglot"
    folder.mkdir(parents=True)
    for k in data.OMNIGLOT_FILES:
        (folder / k.name).write_bytes(b"PK\x03\x04 truncated " + k.name.encode())
    return root


def fake_omniglot() -> data.Omniglot:
    """Random drawings with Omniglot's shape and names (what the cache stores)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1623, 20, 28, 28), dtype=torch.uint8, generator=g)
    names = tuple(f"images_background/A/character{i:04d}" for i in range(964)) + \
        tuple(f"images_evaluation/B/character{i:04d}" for i in range(659))
    return data.Omniglot(images, names)


# --------------------------------------------------------------------------------------
# Loader and cache


def test_loader_on_real_data(omniglot):
    imgs, names = omniglot.images, omniglot.names
    assert imgs.shape == (1623, 20, 28, 28) and imgs.dtype == torch.uint8
    assert int(omniglot.background.sum()) == 964 and int((~omniglot.background).sum()) == 659
    assert len(set(names)) == 1623 and names[0] == "images_background/Alphabet_of_the_Magi/character01"
    assert names[964] == "images_evaluation/Angelic/character01"
    # Strokes bright on a dark background, and antialiased: many grey levels between 0 and 255.
    assert imgs.max() == 255 and imgs.float().mean() < 40
    assert ((imgs > 0) & (imgs < 255)).float().mean() > 0.05
    # The data README: Braille/character01 drawings 03 and 19 are byte-identical PNGs.
    braille = names.index("images_background/Braille/character01")
    assert torch.equal(imgs[braille, 2], imgs[braille, 18])
    assert not torch.equal(imgs[braille, 2], imgs[braille, 3])


def test_cache_is_reused_and_corruption_rebuilt(tmp_path, monkeypatch):
    root = fake_zips(tmp_path / "data")
    monkeypatch.setenv("MAMLKIT_CACHE", str(tmp_path / "cache"))
    omniglot = fake_omniglot()
    sources = [verify_file(root / "omniglot" / k.name, k, trust_checksum=True) for k in data.OMNIGLOT_FILES]
    path = data.cache_path(sources, 28)
    calls = []

    def fake_preprocess(folder, size=28, progress=True):
        calls.append(folder)
        return omniglot

    monkeypatch.setattr(data, "preprocess_omniglot", fake_preprocess)

    def load():
        return data.load_omniglot(root, trust_checksum=True, progress=False)

    assert torch.equal(load().images, omniglot.images)
    assert len(calls) == 1 and path.is_file() and path.parent.parent == data.cache_root()
    assert torch.equal(load().images, omniglot.images) and load().names == omniglot.names
    assert len(calls) == 1  # served from the cache
    raw = bytearray(path.read_bytes())
    raw[-5000] ^= 0xFF  # flip pixel bits: the file still parses, the pixel digest does not match
    path.write_bytes(bytes(raw))
    assert data.load_cache(path, sources, 28) is None
    assert torch.equal(load().images, omniglot.images)
    assert len(calls) == 2 and data.load_cache(path, sources, 28) is not None  # rebuilt and rewritten
    path.write_bytes(b"garbage")  # not a safetensors file at all
    load()
    assert len(calls) == 3 and data.load_cache(path, sources, 28) is not None
    assert not list((root / "omniglot").glob("*.safetensors"))  # nothing written into the data folder


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError) as e:
        data.load_omniglot(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "omniglot") in msg and data.OMNIGLOT_FILES[0].url in msg
    assert "--data-root" in msg and "MAMLKIT_DATA" in msg and "`mamlkit data omniglot" in msg
    assert cli.main(["data", "omniglot", "--data-root", str(tmp_path), "--no-download"]) == 2
    assert "images_evaluation.zip" in capsys.readouterr().err
    # A --data-root that names the dataset's own folder is that folder, not DIR/omniglot/omniglot.
    with pytest.raises(DataError) as e:
        data.load_omniglot(tmp_path / "omniglot")
    assert f"Omniglot is not in {tmp_path / 'omniglot'}." in str(e.value) and "omniglot/omniglot" not in str(e.value)
    # Half a dataset: the folder that holds one zip is named, with only the other one to download.
    (tmp_path / "images_evaluation.zip").write_bytes(b"only its name matters here")
    with pytest.raises(DataError) as e:
        data.load_omniglot(tmp_path)
    assert f"Omniglot is not in {tmp_path}." in str(e.value)
    assert data.OMNIGLOT_FILES[0].url in str(e.value) and data.OMNIGLOT_FILES[1].url not in str(e.value)


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    assert cli.main(["data", "omniglot", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "downloading failed" in err and data.OMNIGLOT_FILES[1].url in err and str(tmp_path) in err
    assert not list((tmp_path / "omniglot").glob("*.zip"))  # no partial file left behind


def test_wrong_checksum_is_refused_unless_trusted(tmp_path, cache_dir, capsys):
    root = fake_zips(tmp_path)
    with pytest.raises(DataError, match="unknown checksum.*--trust-checksum"):
        data.load_omniglot(root, progress=False)
    assert cli.main(["data", "omniglot", "--data-root", str(root), "--no-download"]) == 2
    assert "unknown checksum" in capsys.readouterr().err
    # Trusted, the truncated zip then fails to open: still a clear error, not a traceback.
    with pytest.raises(DataError, match="not a valid zip"):
        data.load_omniglot(root, trust_checksum=True, progress=False)


def test_known_checksums_of_both_versions(tmp_path):
    f = tmp_path / "x.zip"
    f.write_bytes(b"omniglot")
    md5, sha = data.file_digests(f)
    assert verify_file(f, KnownFile("x.zip", "u", md5={"official": md5}, sha256={})) == sha
    assert verify_file(f, KnownFile("x.zip", "u", md5={}, sha256={"rebuilt": sha})) == sha
    with pytest.raises(DataError):
        verify_file(f, KnownFile("x.zip", "u", md5={"official": "0" * 32}, sha256={"rebuilt": "0" * 64}))
    assert data.OMNIGLOT_FILES[0].md5["official"] == "68d2efa1b9178cc56df9314c21c6e718"
    assert data.OMNIGLOT_FILES[1].md5["official"] == "6b91aef0f799c5bb55b94e3f2daec811"


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLKIT_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.resolve_root(tmp_path / "flag") == tmp_path / "flag"
    assert data.resolve_root("") == tmp_path / "env"
    monkeypatch.delenv("MAMLKIT_DATA")
    assert data.resolve_root(None) == tmp_path / "xdg" / "mamlkit"
    marker = "images_background.zip"
    assert data.dataset_dir("omniglot", tmp_path / "flag", marker) == tmp_path / "flag" / "omniglot"
    (tmp_path / "zips").mkdir()
    (tmp_path / "zips" / marker).write_bytes(b"")
    assert data.dataset_dir("omniglot", tmp_path / "zips", marker) == tmp_path / "zips"  # the folder itself
    assert data.dataset_dir("omniglot", tmp_path / "x" / "omniglot", marker) == tmp_path / "x" / "omniglot"


# --------------------------------------------------------------------------------------
# Splits and rotations


def test_paper_split_sizes_disjoint_and_order_free(omniglot):
    s = split_indices(omniglot.names, "paper")
    assert {k: len(v) for k, v in s.items()} == {"train": 1100, "val": 100, "test": 423}
    sets = [set(v.tolist()) for v in s.values()]
    assert set.union(*sets) == set(range(1623)) and sum(map(len, sets)) == 1623
    # The split depends on the names only, not on their order.
    perm = torch.randperm(1623, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [omniglot.names[i] for i in perm]
    s2 = split_indices(shuffled, "paper")
    for k in s:
        assert {omniglot.names[i] for i in s[k].tolist()} == {shuffled[i] for i in s2[k].tolist()}


# sha256 of the newline-joined character names of each part (first 16 hex digits): the split is part of
# every published number, so any change to the procedure must be deliberate and must update these.
PINNED = {("paper", "train"): "79887a36251faff8", ("paper", "val"): "3d84cbec472d8ffe",
          ("paper", "test"): "ea391bb1fd7c7e01", ("background", "train"): "d344079dd6aa4f3c",
          ("background", "val"): "e95b7be6f5d6efa9", ("background", "test"): "21a4d8c92a6dd95c"}


def test_splits_are_pinned(omniglot):
    import hashlib

    for (scheme, part), digest in PINNED.items():
        idx = split_indices(omniglot.names, scheme)[part].tolist()
        names = "\n".join(omniglot.names[i] for i in idx)
        assert hashlib.sha256(names.encode()).hexdigest()[:16] == digest, (scheme, part)


def test_background_split(omniglot):
    s = split_indices(omniglot.names, "background")
    assert {k: len(v) for k, v in s.items()} == {"train": 864, "val": 100, "test": 659}
    bg = omniglot.background
    assert bg[s["train"]].all() and bg[s["val"]].all() and not bg[s["test"]].any()
    assert not set(s["train"].tolist()) & set(s["val"].tolist())


def test_family_splits_hold_disjoint_characters(omniglot, omniglot_dir, cache_dir):
    from mamlkit.presets import preset_config

    cfg = preset_config("omniglot-5w1s", {"data_root": str(omniglot_dir)})
    family = get_family("omniglot")
    imgs = {split: family.build(cfg, split).images for split in ("train", "val", "test")}
    assert [v.shape[0] for v in imgs.values()] == [1100, 100, 423]
    flat = {k: {bytes(c.numpy()) for c in v} for k, v in imgs.items()}
    assert not (flat["train"] & flat["test"]) and not (flat["train"] & flat["val"])
    assert not (flat["val"] & flat["test"])
    batch = family.build(cfg, "train").sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 5, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0 <= batch.support_x.min() and batch.support_x.max() <= 1


def _identify(x: torch.Tensor, table: torch.Tensor) -> list[tuple[int, int, int]]:
    """(character, drawing, rotation) of each image in ``x [B, 1, H, W]``, looked up in
    ``table [4, C, M, H, W]``."""
    out = []
    for img in x[:, 0]:
        hit = (table == img).flatten(-2).all(-1).nonzero()
        assert hit.shape[0] == 1
        r, c, m = hit[0].tolist()
        out.append((c, m, r))
    return out


@pytest.mark.parametrize("mode", ["per_task", "expand", "none"])
def test_rotation_modes(mode):
    C, M, N, K, Q = 6, 7, 4, 2, 3
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (C, M, 5, 5), dtype=torch.uint8, generator=g)
    table = rotated(images).reshape(4, C, M, 5, 5)
    dist = OmniglotTasks(images, N, K, Q, rotations=mode)
    batch = dist.sample(60, torch.Generator().manual_seed(1))
    raw = TaskBatch(*(t if not t.is_floating_point() else (t * 255).round().to(torch.uint8)
                      for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    rotations_seen, same_char_twice = set(), False
    for t in range(raw.num_tasks):
        ids = _identify(torch.cat([raw.support_x[t], raw.query_x[t]]), table)
        labels = torch.cat([raw.support_y[t], raw.query_y[t]]).tolist()
        per_label = {}
        for (c, m, r), y in zip(ids, labels):
            per_label.setdefault(y, []).append((c, m, r))
        chars = []
        for items in per_label.values():
            assert len({(c, r) for c, _, r in items}) == 1      # one character, one rotation per class
            assert len({m for _, m, _ in items}) == K + Q        # support and query disjoint
            chars.append(items[0][0])
            rotations_seen.add(items[0][2])
        same_char_twice |= len(set(chars)) < N
        if mode != "expand":
            assert len(set(chars)) == N                          # distinct characters
    assert rotations_seen == ({0} if mode == "none" else {0, 1, 2, 3})
    assert same_char_twice == (mode == "expand")


def test_rotation_class_counts():
    images = torch.zeros(2, 20, 5, 5, dtype=torch.uint8)
    OmniglotTasks(images, 8, 1, 1, rotations="expand")      # 2 characters x 4 rotations = 8 classes
    from mamlkit.base.errors import UserError

    with pytest.raises(UserError):
        OmniglotTasks(images, 3, 1, 1, rotations="per_task")
    with pytest.raises(UserError):
        OmniglotTasks(images, 2, 10, 11)


# --------------------------------------------------------------------------------------
# Conv4 and batch-norm modes


def test_conv4_shapes():
    torch.manual_seed(0)
    from mamlkit.presets import preset_config

    omni = build_model(get_family("omniglot").model_spec(preset_config("omniglot-20w1s")))
    assert omni(torch.rand(3, 1, 28, 28)).shape == (3, 20)
    convs = [m for m in omni.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.stride == (2, 2) and c.out_channels == 64 for c in convs)
    assert omni.head.in_features == 64
    mini = build_model(get_family("miniimagenet").model_spec(preset_config("miniimagenet-5w1s")))
    assert mini(torch.rand(2, 3, 84, 84)).shape == (2, 5) and mini.head.in_features == 32 * 5 * 5
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in mini.modules()) == 4
    assert conv4(1, 5, 64, 28).head.in_features == 64 * 2 * 2
    assert conv4(1, 5, 64, 28, pool=True).head.in_features == 64 * 1 * 1


def _tiny_batch(T=2, N=3, K=1, Q=2, size=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (10, 6, size, size), dtype=torch.uint8, generator=g)
    return OmniglotTasks(images, N, K, Q).sample(T, g).to(dtype=dtype)


def _learner(bn_mode, strategy, hidden=3, size=8, steps=2, seed=0, lr=0.4):
    torch.manual_seed(seed)
    model = conv4(1, 3, hidden, size, global_pool=True).double()
    return MAML(model, inner_lr=lr, inner_steps=steps, loss_fn="cross_entropy", strategy=strategy,
                bn_mode=bn_mode)


@pytest.mark.parametrize("bn_mode", ["transductive", "support"])
def test_conv4_vmap_equals_loop_second_order(bn_mode):
    batch = _tiny_batch(T=3, size=16)
    grads = {}
    for strategy in ("vmap", "loop"):
        learner = _learner(bn_mode, strategy, hidden=4, size=16)
        metrics = learner.meta_backward(batch)
        grads[strategy] = (metrics["loss"], {k: p.grad.clone() for k, p in learner.model.named_parameters()})
    assert abs(grads["vmap"][0] - grads["loop"][0]) < 1e-12
    for k, g in grads["loop"][1].items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(grads["vmap"][1][k], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bn_mode,strategy",
                         [("support", "loop"), ("support", "vmap"), ("transductive", "loop")])
def test_meta_gradient_matches_finite_differences(bn_mode, strategy):
    batch = _tiny_batch()
    learner = _learner(bn_mode, strategy, lr=0.05)  # a small step keeps the tiny net's loss smooth at eps
    params = dict(learner.model.named_parameters())
    learner.model.zero_grad()
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
        analytic = sum((params[k].grad * v[k]).sum() for k in params).item()
        eps, vals = 1e-6, []
        for sign in (1, -1):
            with torch.no_grad():
                for k, p in params.items():
                    p.add_(sign * eps * v[k])
            vals.append(learner.meta_loss(batch)[0].item())
            with torch.no_grad():
                for k, p in params.items():
                    p.sub_(sign * eps * v[k])
        numeric = (vals[0] - vals[1]) / (2 * eps)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def _query_predictions(bn_mode, batch):
    learner = _learner(bn_mode, "loop")
    params = dict(learner.model.named_parameters())
    objective = support_stats_objective(query_objective) if bn_mode == "support" else query_objective
    fn = make_task_fn(learner.model, params, {}, loss_fn=learner.loss_fn, rule=sgd(0.4), steps=2,
                      first_order=False, objective=objective)
    return fn(batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0])[1]


def test_support_mode_is_not_transductive():
    batch = _tiny_batch()
    other = batch.query_x.clone()
    g = torch.Generator().manual_seed(9)
    other[:, 1:] = torch.rand(other[:, 1:].shape, generator=g, dtype=other.dtype)
    changed = TaskBatch(batch.support_x, batch.support_y, other, batch.query_y)
    sup_a, sup_b = _query_predictions("support", batch), _query_predictions("support", changed)
    assert torch.equal(sup_a[0], sup_b[0])                           # query 0 ignores the other queries
    tr_a, tr_b = _query_predictions("transductive", batch), _query_predictions("transductive", changed)
    assert (tr_a[0] - tr_b[0]).abs().max() > 1e-3                   # the paper's mode does not
    # Support statistics are exactly those of a support-only batch: queries equal to the support
    # images get the support images' own logits.
    same = TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y)
    torch.testing.assert_close(_query_predictions("support", same), _query_predictions("transductive", same),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# End to end


def test_cli_train_omniglot_end_to_end(tmp_path, cache_dir, omniglot_dir, capsys):
    args = ["train", "omniglot-5w1s", "--iterations", "3", "--meta-batch", "4", "--data-root", str(omniglot_dir),
            "--out-dir", str(tmp_path), "--eval-tasks", "30", "--val-tasks", "5", "--threads", "1",
            "--no-progress", "--no-tensorboard"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "98.7 ± 0.4" in out and "Batch norm: transductive" in out
    result = json.loads((tmp_path / "omniglot-5w1s-maml" / "eval.json").read_text())
    acc = result["accuracy"]["maml"]
    assert sorted(acc) == ["0", "1", "2", "3"] and result["num_tasks"] == 30
    assert result["bn_mode"] == "transductive" and result["paper"] == {"maml": "98.7 ± 0.4"}
    assert acc["0"]["mean"] < 0.4 and acc["3"]["mean"] > acc["0"]["mean"] + 0.1  # adaptation helps
    cfg = json.loads((tmp_path / "omniglot-5w1s-maml" / "config.json").read_text())
    assert (cfg["inner_lr"], cfg["inner_steps"], cfg["test_inner_steps"], cfg["n_way"]) == (0.4, 1, 3, 5)
    # The non-transductive mode runs end to end and says so.
    args[3] = "1"
    assert cli.main(args + ["--bn-mode", "support", "--run-name", "support"]) == 0
    assert "non-transductive" in capsys.readouterr().out


def test_cli_rejects_bad_omniglot_options(tmp_path, capsys):
    assert cli.main(["train", "omniglot-5w1s", "--split", "vinyals", "--out-dir", str(tmp_path)]) == 2
    assert "background" in capsys.readouterr().err
    assert cli.main(["train", "omniglot-5w1s", "--bn-mode", "eval", "--out-dir", str(tmp_path)]) == 2


def test_symlinked_folder_with_cache_elsewhere(tmp_path, omniglot, omniglot_dir, cache_dir):
    root = linked_copy(tmp_path, omniglot_dir)
    assert torch.equal(data.load_omniglot(root, progress=False).images, omniglot.images)
    assert not list((root / "omniglot").glob("*.safetensors"))  # nothing written into the data folder
    shutil.rmtree(root)
