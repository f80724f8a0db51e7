"""Checkpoint validation: every mamlkit file (training and meta-RL checkpoints, adapted models, shipped models)
is checked before anything uses it. Non-finite tensors, tensors changed since they were written (their sha256),
meta-RL tensors that do not fit the policy, and a JSON state of the wrong shape are each refused: exit 2 from
the CLI with a message that names the tensor or the field, a ``UserError`` from ``mamlkit.load``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_faults import _rewrite, small_cfg

import mamlkit
from mamlkit import checkpoint
from mamlkit.base.errors import UserError
from mamlkit.loop import train

ASSETS = Path(mamlkit.__file__).parent / "assets"
RL_FLAGS = ["--hidden-sizes", "8", "--meta-batch", "2", "--traj-per-task", "2", "--horizon", "5", "--eval-tasks",
            "2", "--eval-traj", "2", "--val-every", "100", "--no-baselines", "--no-progress"]


@pytest.fixture
def run_dir(tmp_path):
    """A finished two-iteration sinusoid run, with the support and query CSVs `mamlkit adapt` takes."""
    run = tmp_path / "r"
    train.fit(train.new_trainer(small_cfg(tmp_path, iterations=2, val_tasks=0), run))
    (tmp_path / "s.csv").write_text("x,y\n0.1,0.2\n0.3,0.1\n0.5,0.4\n0.2,0.2\n0.6,0.1\n")
    (tmp_path / "q.csv").write_text("x\n0.1\n0.2\n")
    return run


@pytest.fixture
def rl_run(tmp_path, cli):
    """A one-iteration nav2d run (no validation, so `rl eval` evaluates its checkpoint)."""
    code, _, err = cli("rl", "train", "nav2d", "--iterations", "1", "--out-dir", tmp_path, "--run-name", "rl",
                       *RL_FLAGS)
    assert code == 0, err
    return tmp_path / "rl"


def entry_points(run: Path) -> list[list]:
    """Every command that loads a training checkpoint: eval, adapt, resume."""
    folder = run.parent
    return [["eval", run, "--eval-tasks", "3", "--out", folder / "ev"],
            ["adapt", run, "--support", folder / "s.csv", "--query", folder / "q.csv"],
            ["train", "--resume", run, "--iterations", "3"]]


def rl_entry_points(run: Path) -> list[list]:
    return [["rl", "eval", run, "--last", "--eval-tasks", "2", "--out", run.parent / "rl-ev"],
            ["rl", "adapt", run, "--goal", "0.1", "0.1", "--steps", "1", "--traj", "2", "--out", run.parent / "a.png"]]


def assert_refused(cli, commands, *needles: str) -> None:
    for args in commands:
        code, _, err = cli(*args)
        assert code == 2 and "Traceback" not in err, (args, code, err)
        for needle in needles:
            assert needle in err, (args, needle, err)


def resave(path: Path, change_tensors=None, change_state=None) -> None:
    """Load ``path`` as written, change its tensors and/or state, and write it again through ``checkpoint.save``
    (so its digests are those of the changed tensors: only the change itself is under test)."""
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    if change_tensors:
        change_tensors(tensors)
    if change_state:
        change_state(state)
    checkpoint.save(path, tensors, state)


def set_state(path: Path, text: str) -> None:
    """Replace the state record of ``path`` with ``text`` (any text: crafted JSON), keeping everything else."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    _rewrite(path, meta={**meta, "state": text})


# --------------------------------------------------------------------------------------
# NaN or inf in any stored tensor: refused on load, naming the tensor (every loader).


def _poison(name: str, value: float):
    def change(tensors):
        tensors[name].view(-1)[0] = value
    return change


def test_non_finite_tensors_are_refused_naming_the_tensor(cli, run_dir, rl_run, tmp_path):
    ckpt = run_dir / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    resave(ckpt, _poison("meta/0.weight", float("nan")))
    assert_refused(cli, entry_points(run_dir), "meta/0.weight (1 of 8 values)", "NaN or infinite")
    with pytest.raises(UserError, match="meta/0.weight"):
        mamlkit.load(run_dir)
    ckpt.write_bytes(good)  # the optimiser's moments are checked too: resuming would train on them
    resave(ckpt, _poison("optim/1/exp_avg_sq", float("inf")))
    assert_refused(cli, [["train", "--resume", run_dir, "--iterations", "3"]], "optim/1/exp_avg_sq")

    ckpt.write_bytes(good)  # an adapted model (TaskModel.save)
    adapted = tmp_path / "adapted.safetensors"
    mamlkit.load(run_dir).adapt(torch.rand(5, 1), torch.rand(5, 1)).save(adapted)
    resave(adapted, _poison("param/4.bias", -float("inf")))
    with pytest.raises(UserError, match=r"param/4\.bias"):
        mamlkit.load(adapted)

    resave(rl_run / "checkpoint.safetensors", _poison("meta/mean.2.weight", float("nan")))  # a meta-RL policy
    assert_refused(cli, rl_entry_points(rl_run), "meta/mean.2.weight", "NaN or infinite")

    shipped = tmp_path / "shipped.safetensors"  # a shipped model, copied and damaged
    shutil.copy(ASSETS / "omniglot-5w1s.safetensors", shipped)
    resave(shipped, _poison("meta/body.0.0.weight", float("nan")))
    with pytest.raises(UserError, match=r"meta/body\.0\.0\.weight"):
        mamlkit.load(shipped)


# --------------------------------------------------------------------------------------
# Meta-RL checkpoints go through the same validation as supervised ones.


def test_rl_checkpoints_are_checked_like_supervised_ones(cli, rl_run):
    ckpt = rl_run / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    tensors = load_file(str(ckpt))
    assert tensors["meta/mean.0.weight"].shape == (8, 2)

    def reshaped(shape):
        def change(t):
            t["meta/mean.0.weight"] = torch.zeros(shape)
        return change

    resave(ckpt, reshaped((2,)))  # broadcasts: copy_ would fill every row with it, silently
    assert_refused(cli, rl_entry_points(rl_run), "meta/mean.0.weight has shape [2]", "[8, 2]")
    ckpt.write_bytes(good)
    resave(ckpt, reshaped((3, 2)))  # does not broadcast
    assert_refused(cli, rl_entry_points(rl_run), "meta/mean.0.weight has shape [3, 2]")
    ckpt.write_bytes(good)

    def extra(t):
        t["meta/mean.9.weight"] = torch.zeros(2)
    resave(ckpt, extra)
    assert_refused(cli, rl_entry_points(rl_run), "meta/mean.9.weight is not a tensor of this model")
    ckpt.write_bytes(good)
    resave(ckpt, change_state=lambda s: s.pop("step"))
    assert_refused(cli, rl_entry_points(rl_run), "holds no step")
    ckpt.write_bytes(good)
    resave(ckpt, change_state=lambda s: s.update(config=[1, 2]))
    assert_refused(cli, rl_entry_points(rl_run), "'config' is an array, not an object")
    ckpt.write_bytes(good)
    resave(ckpt, change_state=lambda s: s["config"].update(env="walker", action_scale=0))
    assert_refused(cli, rl_entry_points(rl_run), "run config is invalid", "env must be one of")
    ckpt.write_bytes(good)
    resave(ckpt, change_state=lambda s: s["config"].update(inner_lr=float("inf")))
    assert_refused(cli, rl_entry_points(rl_run) + [["rl", "train", "--resume", rl_run, "--iterations", "2"]],
                   "config.inner_lr", "inf")


# --------------------------------------------------------------------------------------
# A tensor changed after it was written (one bit flipped on a disk): its sha256 no longer matches.


def _flip_bit(path: Path, name: str) -> None:
    """Flip the lowest bit of tensor ``name``'s first byte in the file (a float32's last mantissa bit: the value
    stays finite and changes by one unit in the last place)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[8 + n + start] ^= 1
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_tensor_data_is_refused(cli, run_dir, rl_run):
    ckpt = run_dir / "checkpoint.safetensors"
    before = load_file(str(ckpt))["meta/2.weight"].clone()
    _flip_bit(ckpt, "meta/2.weight")
    after = load_file(str(ckpt))["meta/2.weight"]
    assert torch.isfinite(after).all() and (after != before).sum() == 1  # one value, one ulp: plausible, wrong
    assert_refused(cli, entry_points(run_dir), "meta/2.weight's values do not match the sha256")
    with pytest.raises(UserError, match=r"is damaged: meta/2\.weight"):
        mamlkit.load(run_dir)
    _flip_bit(rl_run / "checkpoint.safetensors", "meta/log_std")
    assert_refused(cli, rl_entry_points(rl_run), "meta/log_std's values do not match the sha256")


def test_digests_are_the_sha256_of_each_tensor_and_old_files_still_load(cli, run_dir, rl_run, tmp_path):
    for path in (run_dir / "checkpoint.safetensors", rl_run / "checkpoint.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            record = json.loads(f.metadata()[checkpoint.DIGESTS])
        tensors = load_file(str(path))
        assert set(record) == set(tensors)
        for name, t in tensors.items():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert record[name] == [str(t.dtype).removeprefix("torch."), list(t.shape), hashlib.sha256(raw).hexdigest()]
    # a file written before digests were recorded has no record: it loads, and is otherwise checked as before
    with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != checkpoint.DIGESTS}
    _rewrite(run_dir / "checkpoint.safetensors", meta=meta)
    code, _, err = cli("eval", run_dir, "--eval-tasks", "3", "--out", tmp_path / "ev")
    assert code == 0, err
    # the record itself is checked: a tensor removed or added since writing is named
    tensors = load_file(str(rl_run / "checkpoint.safetensors"))
    del tensors["meta/log_std"]
    _rewrite(rl_run / "checkpoint.safetensors", tensors)
    assert_refused(cli, rl_entry_points(rl_run)[:1], "meta/log_std is missing")


# --------------------------------------------------------------------------------------
# Crafted JSON state: depth, types, unknown names, unavailable devices, non-finite settings.


def _config_change(**values):
    return lambda s: s["config"].update(values)


CRAFTED = {
    "nested 100,000 deep": (None, "nests arrays or objects more than 32 levels deep"),
    "algo os": (_config_change(algo="os"), "unknown algorithm 'os'"),
    "device cuda:7": (_config_change(device="cuda:7"), "asks for device 'cuda:7'"),
    "device nonsense": (_config_change(device="os"), "not a torch device"),
    "model_spec a list": (lambda s: s.update(model_spec=["mlp"]), "'model_spec' is an array, not an object or null"),
    "inner_lr inf": (_config_change(inner_lr=float("inf")), "config.inner_lr in its 'state' record is inf"),
    "a hidden size NaN": (lambda s: s["model_spec"].update(hidden=[8, float("nan")]), "model_spec.hidden[1]"),
    "step negative": (lambda s: s.update(step=-3), "'step' is -3, not a count"),
    "step a string": (lambda s: s.update(step="3"), "'step' is a string, not an integer"),
    "strategy a list": (lambda s: s.update(strategy=["vmap"]), "'strategy' is an array"),
    "kind unknown": (lambda s: s.update(kind="os"), "'kind' is 'os', not one of"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_state_is_refused_naming_the_field(cli, run_dir, case):
    change, message = CRAFTED[case]
    ckpt = run_dir / "checkpoint.safetensors"
    if change is None:
        set_state(ckpt, '{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        resave(ckpt, change_state=change)
    assert_refused(cli, entry_points(run_dir), message)
    with pytest.raises(UserError, match=re.escape(message)):
        mamlkit.load(run_dir)


def test_crafted_adapted_model_and_rl_states_are_refused(cli, run_dir, rl_run, tmp_path):
    adapted = tmp_path / "adapted.safetensors"
    mamlkit.load(run_dir).adapt(torch.rand(5, 1), torch.rand(5, 1)).save(adapted)
    good = adapted.read_bytes()
    for change, message in [(lambda s: s.update(model_spec=[1]), "'model_spec' is an array"),
                            (lambda s: s.update(num_classes="5"), "'num_classes' is a string"),
                            (lambda s: s.update(class_names=[1, 2]), "'class_names' holds values that are not")]:
        adapted.write_bytes(good)
        resave(adapted, change_state=change)
        with pytest.raises(UserError, match=re.escape(message)):
            mamlkit.load(adapted)
    set_state(rl_run / "checkpoint.safetensors", "[" * 100_000 + "]" * 100_000)
    assert_refused(cli, rl_entry_points(rl_run), "nests arrays or objects more than 32 levels deep")


def test_the_shipped_models_carry_digests():
    from safetensors import safe_open

    assets = sorted((Path(checkpoint.__file__).parent / "assets").glob("*.safetensors"))
    assert len(assets) >= 3
    for path in assets:
        with safe_open(path, "pt") as f:
            assert "tensors_sha256" in f.metadata(), path.name
        checkpoint.load(path)  # and they match them
