"""A run's life from the command line: what a stop before the first checkpoint leaves, what a stop while
the baseline trains says, checks that fail before the first step rather than after training, and resuming
a finished run. Every command a message names is run here and must work; no traceback anywhere."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import config_flags as flags
from PIL import Image
from safetensors.torch import load_file

from mamlkit import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(iterations=6, log_every=1, val_every=3, val_tasks=4, checkpoint_every=100, progress=False,
             tensorboard=False, hidden_sizes=(8, 8), meta_batch=4, eval_tasks=10, eval_query=10,
             eval_steps=(0, 1), eval_shots=(5,), test_inner_steps=1, strategy="vmap", threads=1,
             baseline_lrs=(0.01, 0.1))

# Code run before `mamlkit.cli.main` in a subprocess: a SIGTERM sent to itself at a chosen moment.
STOP_IN_TRIAL = """
from mamlkit.exec import tuning
_settle = tuning.settle_strategy
def settle(*args, **kwargs):  # the signal lands while `auto` times the strategies
    os.kill(os.getpid(), signal.SIGTERM)
    return _settle(*args, **kwargs)
tuning.settle_strategy = settle
"""
STOP_IN_PREPROCESSING = """
from mamlkit.loop import train
_get = train.get_family
class Family:  # the signal lands while the training split's data is prepared
    def __init__(self, family): self.family = family
    def __getattr__(self, name): return getattr(self.family, name)
    def build(self, cfg, split):
        if split == "train":
            os.kill(os.getpid(), signal.SIGTERM)
        return self.family.build(cfg, split)
train.get_family = lambda name: Family(_get(name))
"""
STOP_IN_BASELINE = """
from mamlkit.loop import train
_rate = train.meta_lr_at
def rate(cfg, step):  # the signal lands before the baseline's fourth update
    if cfg.algo == "pretrain" and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return _rate(cfg, step)
train.meta_lr_at = rate
"""


def run_patched(patch: str, *args) -> tuple[int, str, str]:
    """``mamlkit ARGS`` in a subprocess, after ``patch``; returns (exit code, stdout, stderr)."""
    code = f"import os, signal, sys\n{patch}\nfrom mamlkit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def commands_in(text: str) -> list[str]:
    """The `mamlkit ...` commands a message names."""
    return re.findall(r"`(mamlkit [^`]*)`", text)


def step_of(path: Path) -> int:
    return checkpoint.load(path)[1]["step"]


def sinusoid(tmp_path: Path, name: str = "r", **kw) -> list:
    values = {**SMALL, **kw}
    if not values.get("compare_pretrained", True):
        del values["baseline_lrs"]  # refused for a run without a baseline
    return ["train", "sinusoid", "--out-dir", tmp_path, "--run-name", name, *flags(values)]


# --------------------------------------------------------------------------------------
# A stop before the first checkpoint: no resume command (there is nothing to resume), and the folder
# holds no run, so the same command starts it again without --overwrite.


@pytest.mark.parametrize("patch, strategy", [(STOP_IN_TRIAL, "auto"), (STOP_IN_PREPROCESSING, "vmap")],
                         ids=["auto-trial", "preprocessing"])
def test_a_stop_before_the_first_checkpoint_names_no_dead_command(cli, tmp_path, patch, strategy):
    args = sinusoid(tmp_path, strategy=strategy, compare_pretrained=False)
    run = tmp_path / "r"
    code, out, err = run_patched(patch, *args)
    assert code == 143, err
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    assert not (run / "checkpoint.safetensors").exists()
    assert "--resume" not in out + err and "--overwrite" not in out + err, out + err
    for command in commands_in(out + err):  # any command it names works
        assert cli(*shlex.split(command)[1:])[0] == 0, command
    # resuming it is refused with what to do instead, naming no command that cannot work
    code, _, err = cli("train", "--resume", run)
    assert code == 2 and "no checkpoint" in err and "Traceback" not in err
    assert not any("--resume" in c for c in commands_in(err)), err
    # the folder holds no run: the same command trains, without --overwrite
    code, _, err = cli(*args)
    assert code == 0, err
    assert step_of(run) == SMALL["iterations"]


def test_a_missing_data_folder_leaves_no_run_behind(cli, tmp_path):
    base = ["train", "images", "--image-size", "16", "--filters", "2", "--iterations", "2", "--k-query", "1",
            "--inner-steps", "1", "--test-inner-steps", "1", "--meta-batch", "2", "--eval-tasks", "4",
            "--val-tasks", "0", "--strategy", "loop", "--out-dir", tmp_path / "runs", "--threads", "1",
            "--no-progress", "--no-tensorboard"]
    code, _, err = cli(*base, "--path", tmp_path / "missing")
    assert code == 2 and "missing" in err and "Traceback" not in err
    assert "--resume" not in err
    code, _, err = cli(*base, "--path", image_folder(tmp_path / "imgs", classes=30))
    assert code == 0, err
    assert step_of(tmp_path / "runs" / "images-maml") == 2


# --------------------------------------------------------------------------------------
# A stop while the baseline trains names one command, the run's resume, and it finishes the run.


def test_a_stop_in_the_baseline_names_one_resume_that_finishes_the_run(cli, tmp_path):
    run = tmp_path / "r"
    code, out, err = run_patched(STOP_IN_BASELINE, *sinusoid(tmp_path))
    assert code == 143, err
    assert "Traceback" not in err
    assert step_of(run) == 6 and step_of(run / "pretrained") == 3
    assert not (run / "eval.md").exists()
    commands = commands_in(out + err)
    assert commands and set(commands) == {f"mamlkit train --resume {run}"}, out + err
    code, out, err = cli(*shlex.split(commands[0])[1:])
    assert code == 0, err
    assert step_of(run) == 6 and step_of(run / "pretrained") == 6
    assert set(json.loads((run / "eval.json").read_text())["mse"]) == {"maml", "pretrain"}


# --------------------------------------------------------------------------------------
# Checks that can only fail after training run before the first step.


def image_folder(root: Path, classes: int, per_class: int = 4) -> Path:
    """``root/classNN/<i>.png``: constant-colour images, one colour per class."""
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        colour = np.array([(c * 37) % 256, (c * 91 + 50) % 256, (c * 13 + 100) % 256], dtype=np.uint8)
        for i in range(per_class):
            Image.fromarray(np.broadcast_to(colour, (12 + i, 12, 3)).copy()).save(root / f"class{c:02d}" / f"{i}.png")
    return root


@pytest.mark.parametrize("extra, split", [((), "val"), (("--val-tasks", "0"), "test"),
                                          (("--val-tasks", "0", "--compare-pretrained", "--baseline-lrs", "0.1"),
                                           "val")],
                         ids=["validation", "report", "baseline-tuning"])
def test_ten_classes_fail_before_the_first_step(cli, tmp_path, extra, split):
    root = image_folder(tmp_path / "imgs10", classes=10)
    code, out, err = cli("train", "images", "--path", root, "--image-size", "16", "--filters", "2", "--iterations", "6",
                         "--val-every", "3", "--log-every", "1", "--checkpoint-every", "2", "--k-query", "1",
                         "--inner-steps", "1", "--test-inner-steps", "1", "--meta-batch", "2", "--eval-tasks", "4",
                         "--strategy", "loop", "--out-dir", tmp_path / "runs", "--threads", "1", "--no-progress",
                         "--no-tensorboard", *extra)
    assert code == 2, err
    assert f"5-way tasks need 5 classes in {split}" in err and "Traceback" not in err
    run = tmp_path / "runs" / "images-maml"
    assert not (run / "checkpoint.safetensors").exists()  # nothing trained ...
    logged = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    assert logged == ""  # ... not one step
    assert "--resume" not in err


# --------------------------------------------------------------------------------------
# Resuming a finished run: nothing to do says so; more iterations extend the baseline too, and the report
# states the iterations of each.


def test_resume_of_a_finished_run(cli, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli(*sinusoid(tmp_path))
    assert code == 0, err
    files = ["checkpoint.safetensors", "config.json", "metrics.jsonl", "eval.md", "eval.json",
             "pretrained/checkpoint.safetensors", "pretrained/config.json", "pretrained/metrics.jsonl"]
    before = {f: (run / f).read_bytes() for f in files}
    for asked in (4, 6):
        code, out, err = cli("train", "--resume", run, "--iterations", asked)
        assert code == 0, err
        said = out + err
        assert "nothing to do" in said and "6 iterations" in said, said
        assert "Traceback" not in said
        assert {f: (run / f).read_bytes() for f in files} == before, asked
        for command in commands_in(said):
            assert command.startswith(("mamlkit eval", "mamlkit train --resume")), command
    code, out, err = cli("eval", run, "--overwrite")  # what the message offers to evaluate again
    assert code == 0, err
    # a report setting changed: the report is written again, nothing trains
    code, out, err = cli("train", "--resume", run, "--eval-tasks", 12)
    assert code == 0, err
    assert json.loads((run / "eval.json").read_text())["num_tasks"] == 12
    assert (run / "checkpoint.safetensors").read_bytes() == before["checkpoint.safetensors"]
    assert (run / "pretrained/checkpoint.safetensors").read_bytes() == before["pretrained/checkpoint.safetensors"]
    # below the iterations trained, a run whose report is missing: said, finished at what it trained
    (run / "eval.md").unlink()
    code, out, err = cli("train", "--resume", run, "--iterations", 4)
    assert code == 0, err
    assert "--iterations 4 is below the 6 it has trained" in err and (run / "eval.md").exists()
    assert step_of(run) == 6 and json.loads((run / "config.json").read_text())["iterations"] == 6
    # more iterations: MAML and its baseline train on, and equal a run trained straight to 10
    code, out, err = cli("train", "--resume", run, "--iterations", 10)
    assert code == 0, err
    assert step_of(run) == 10 and step_of(run / "pretrained") == 10
    report = json.loads((run / "eval.json").read_text())
    assert report["iterations"] == {"maml": 10, "pretrain": 10}
    assert "maml 10, pretrain 10" in (run / "eval.md").read_text()
    code, _, err = cli(*sinusoid(tmp_path, "straight", iterations=10))
    assert code == 0, err
    straight = tmp_path / "straight"
    for part in ("", "pretrained/"):
        ours, theirs = load_file(run / part / "checkpoint.safetensors"), load_file(straight / part /
                                                                                      "checkpoint.safetensors")
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours if "meta/" in k), part
    assert report == json.loads((straight / "eval.json").read_text())
