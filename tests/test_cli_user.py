"""The command line as a user reads it: grouped help with one line of meaning per flag, a preset's values
in its help, a light start-up, TensorBoard's absence said once, reports never replaced silently, and the
one-line summary of `mamlkit adapt`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from mamlkit import cli, config, runfolder
from mamlkit.base import metrics
from mamlkit.config import GROUPS, TrainConfig
from mamlkit.rl.config import GROUPS as RL_GROUPS
from mamlkit.rl.config import RLConfig

TINY = ["--iterations", "4", "--log-every", "2", "--val-every", "2", "--val-tasks", "2", "--eval-tasks", "10",
        "--eval-query", "10", "--eval-steps", "0", "1", "--eval-shots", "5", "--hidden-sizes", "8",
        "--no-progress", "--no-tensorboard", "--no-compare-pretrained", "--threads", "1"]


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # whitespace as one space: argparse wraps lines


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are flags: a config's own and every option of the plug-ins of its kinds (which its
    ``options`` field holds)."""
    from mamlkit.base.options import option_fields

    own = [f for f in dataclasses.fields(cls) if f.name != "options"]
    return own + list(option_fields(cls.choices.kinds).values())


@pytest.mark.parametrize("cls,groups", [(TrainConfig, GROUPS), (RLConfig, RL_GROUPS)])
def test_every_config_field_has_a_group_and_a_line_of_meaning(cls, groups):
    for f in flag_fields(cls):
        assert f.metadata.get("group") in groups, f.name
        assert len(f.metadata.get("help", "")) >= 10 and "\n" not in f.metadata["help"], f.name


def assert_grouped(text: str, cls: type, groups: tuple[str, ...], skip: tuple[str, ...] = ()) -> None:
    """Every flag of ``cls`` (but ``skip``) is in ``text`` under its own group heading, with its line of meaning,
    and the groups come in ``groups`` order."""
    positions = [text.index(f" {g}: ") for g in groups]
    assert positions == sorted(positions)
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        group_start = text.index(f" {f.metadata['group']}: ")
        at = re.compile(rf" {re.escape(flag)}[ ,]").search(text, group_start).start()  # in its own group...
        nxt = [p for p in positions if p > group_start]
        assert not nxt or at < nxt[0], f.name
        assert " ".join(f.metadata["help"].split()) in text[at:at + 400], f.name  # ...with its line of meaning


def test_train_help_groups_every_flag_with_its_meaning_and_default(capsys):
    text = help_text(capsys, "train", "--help")
    assert_grouped(text, TrainConfig, GROUPS)  # task, model, inner loop, outer loop, execution, logging
    assert f"α, the inner SGD step size [default: {TrainConfig().inner_lr}]" in text
    assert "default 0.01" not in text  # no bare "default X" lines any more


def test_rl_train_help_groups_every_flag_with_its_meaning_and_default(capsys):
    text = help_text(capsys, "rl", "train", "--help")
    assert_grouped(text, RLConfig, RL_GROUPS, skip=("env",))  # env is the ENV argument
    assert "config fields" not in text  # no flag left outside the groups
    assert "δ, the trust region's bound on the mean KL [default: 0.01]" in text
    assert "[default: 0.1 0.05 0.05]" in text and "default 0.1" not in text


def test_rl_env_help_shows_the_values_a_run_on_it_uses(capsys):
    text = help_text(capsys, "rl", "train", "cheetah-vel", "--help")
    assert_grouped(text, RLConfig, RL_GROUPS, skip=("env",))
    assert "nav2d, 200 cheetah) [cheetah-vel: 200]" in text  # horizon 0 resolved to the env's episode length
    assert "[cheetah-vel: 10.0]" in text and "[default:" not in text
    assert "nav2d, 200 cheetah) [nav2d: 100]" in help_text(capsys, "rl", "train", "nav2d", "--help")


@pytest.mark.parametrize("command", ["eval", "adapt"])
def test_rl_eval_and_adapt_give_every_flag_a_line_of_meaning(command):
    parser = cli.build_parser()
    for name in ("rl", command):
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    assert len(parser._actions) >= 5
    for action in parser._actions:
        assert action.help and len(action.help) >= 10 and "\n" not in action.help, action.dest


HEAVY = ("torch", "numpy", "matplotlib", "safetensors", "transformers", "sentence_transformers", "gymnasium",
         "mujoco", "PIL", "tensorboard")


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["train", "--help"], ["train", "omniglot-5w1s", "--help"],
                                  ["algos", "--help"], ["rl", "--help"], ["rl", "train", "cheetah-dir", "--help"]])
def test_help_and_presets_import_no_heavy_module(argv):
    """`mamlkit --help` and `mamlkit presets` answer without importing torch or any optional stack
    (benchmarks/startup.py measures the time)."""
    code = ("import sys\nfrom mamlkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []", proc.stdout[-300:]


def test_missing_tensorboard_is_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.setattr(metrics, "_NOTED", [])
    metrics.MetricsLog(tmp_path / "a", tensorboard=False).close()
    assert capsys.readouterr().err == ""  # asked for none: nothing to say
    for run in ("b", "c"):
        log = metrics.MetricsLog(tmp_path / run, tensorboard=True)
        assert log.writer is None
        log.close()
    err = capsys.readouterr().err
    assert err.count("no TensorBoard logs") == 1 and "pip install tensorboard" in err
    assert not (tmp_path / "b" / "tensorboard").exists()


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", "sinusoid", *TINY, "--out-dir", str(root), "--run-name", "r"]) == 0
    return root / "r"


def test_train_names_the_files_it_wrote(sinusoid_run):
    for name in ("eval.md", "eval.json", "figure2_fits.png", "figure3_learning_curve.png"):
        assert (sinusoid_run / name).is_file()
    assert not (sinusoid_run / "tensorboard").exists()
    assert ", ".join(runfolder.written(sinusoid_run)) == (
        "checkpoint.safetensors, config.json, metrics.jsonl, metrics.csv, eval.md, eval.json, figure2_fits.png, "
        "figure3_learning_curve.png")


def test_test_guard_is_one_flag_away_on_eval_and_on_resume(sinusoid_run, cli, tmp_path):
    """The run's table is the paper's plain SGD; ``--test-guard`` gives the guarded one, on ``mamlkit eval`` and
    on a resumed run (a report setting: the finished run is reported again)."""
    assert json.loads((sinusoid_run / "eval.json").read_text())["test_guard"] is False
    code, out, err = cli("eval", sinusoid_run, "--eval-tasks", "4", "--out", tmp_path / "g", "--test-guard")
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "eval.json").read_text())["test_guard"] is True
    assert "Test-time adaptation, guarded (--test-guard)" in out and "with step halving" in out
    run = tmp_path / "copy"
    shutil.copytree(sinusoid_run, run)
    code, out, err = cli("train", "--resume", run, "--test-guard")
    assert code == 0, err
    assert json.loads((run / "eval.json").read_text())["test_guard"] is True


def test_eval_never_replaces_a_report_silently(sinusoid_run, cli, tmp_path):
    before = {n: (sinusoid_run / n).read_bytes() for n in ("eval.md", "eval.json", "figure2_fits.png")}
    code, out, err = cli("eval", sinusoid_run, "--eval-tasks", "12")
    assert code == 2 and "already holds eval.md, eval.json, figure2_fits.png" in err and "--overwrite" in err
    assert "--out DIR" in err and "Traceback" not in err
    assert all((sinusoid_run / n).read_bytes() == b for n, b in before.items())  # untouched
    code, out, err = cli("eval", sinusoid_run, "--eval-tasks", "12", "--out", tmp_path / "again")
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "eval.json").read_text())["num_tasks"] == 12
    assert (tmp_path / "again" / "figure3_learning_curve.png").is_file()
    assert f"report: {tmp_path / 'again'} (eval.md, eval.json" in out
    assert cli("eval", sinusoid_run, "--eval-tasks", "12", "--out", tmp_path / "again")[0] == 2  # same rule there
    code, out, err = cli("eval", sinusoid_run, "--eval-tasks", "12", "--overwrite")
    assert code == 0, err
    assert json.loads((sinusoid_run / "eval.json").read_text())["num_tasks"] == 12


def test_adapt_prints_one_summary_line(cli, tmp_path):
    assert cli("example", "omniglot", tmp_path / "task")[0] == 0
    code, out, err = cli("adapt", "omniglot-5w1s", "--support", tmp_path / "task" / "support",
                         "--query", tmp_path / "task" / "query", "--steps", "2")
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("mamlkit: adapted")]
    assert len(lines) == 1
    classes = sorted(p.name for p in (tmp_path / "task" / "support").iterdir())
    assert re.fullmatch(rf"mamlkit: adapted omniglot-5w1s \(maml\): 2 steps of SGD at α=0\.4 on 5 support images "
                        rf"of 5 classes \({re.escape(', '.join(classes))}\); predicting 15 queries", lines[0])
    assert out.count("\n") == 16  # the CSV alone on stdout: a header and one row per query


def test_config_flag_rejects_unknown_groups():
    with pytest.raises(ValueError, match="misc"):
        config.flag(1, "misc", "not a group of the help")
