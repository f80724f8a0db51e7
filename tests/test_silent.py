"""Nothing silent: a diverging run stops with its last finite checkpoint, non-finite settings and inputs beyond
the model's float range are refused by name, `--output` reads its suffix one way, and the log rows of a resumed
run equal an uninterrupted run's."""

import dataclasses
import json
import math
import os
import random
import signal
import typing
from pathlib import Path

import pytest
import torch
from helpers import config_flags as flags
from helpers import write_csv

from mamlkit import checkpoint, config
from mamlkit.base.errors import Diverged
from mamlkit.eval import reports
from mamlkit.loop import train
from mamlkit.presets import preset_config
from mamlkit.rl import config as rlconfig

SMALL = dict(iterations=12, log_every=4, val_every=6, val_tasks=4, checkpoint_every=100, progress=False,
             tensorboard=False, hidden_sizes=(8, 8), meta_batch=4, eval_tasks=10, eval_query=10,
             eval_steps=(0, 1, 2), eval_shots=(5,), test_inner_steps=2, strategy="vmap", threads=1,
             compare_pretrained=False)
RL_SMALL = ["--iterations", "3", "--meta-batch", "2", "--traj-per-task", "2", "--val-every", "0", "--no-baselines",
            "--eval-tasks", "2", "--eval-traj", "2", "--no-progress", "--hidden-sizes", "8", "8"]


def small_cfg(tmp_path, **kw):
    return preset_config("sinusoid", {**SMALL, "out_dir": str(tmp_path), **kw})


def all_finite(run: Path) -> bool:
    tensors, _ = checkpoint.load(run)
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# --------------------------------------------------------------------------------------
# A diverging run stops: exit 1, the step and the likely cause named, the last finite checkpoint kept.


def test_a_diverging_run_stops_with_exit_1_and_keeps_its_last_finite_checkpoint(cli, tmp_path):
    # Adam moves every weight by about the meta rate: finite (~1e30) after step 1, an infinite loss at step 2
    code, out, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", "--meta-lr", "1e30",
                         *flags({**SMALL, "checkpoint_every": 1}))
    run = tmp_path / "r"
    assert code == 1 and "Traceback" not in err, err
    assert "diverged at step 2" in err and "--meta-lr 1e+30" in err and "--dtype float64" in err
    assert f"checkpoint of step 1 in {run} is kept" in err
    _, state = checkpoint.load(run)
    assert state["step"] == 1 and all_finite(run)
    assert not (run / "eval.md").exists()  # no report of NaN
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_non_finite_parameters_never_replace_a_good_checkpoint(tmp_path):
    run = tmp_path / "r"
    trainer = train.fit(train.new_trainer(small_cfg(tmp_path, iterations=4, val_tasks=0), run))
    good = (run / "checkpoint.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(trainer.learner.meta_parameters().values()))[0].fill_(float("nan"))
    trainer.cfg = trainer.cfg.replace(iterations=8, checkpoint_every=1)
    with pytest.raises(Diverged, match=r"diverged at step 5: its meta-training loss is nan.*checkpoint of step 4"):
        train.fit(trainer)
    assert (run / "checkpoint.safetensors").read_bytes() == good


def test_a_report_of_non_finite_losses_is_written_with_them_flagged(tmp_path):
    trainer = train.fit(train.new_trainer(small_cfg(tmp_path, iterations=2, val_tasks=0), tmp_path / "r"))
    with torch.no_grad():  # finite weights whose predictions overflow float32: every loss is inf or nan
        for p in trainer.learner.meta_parameters().values():
            p.mul_(1e30)
    text = reports.report(tmp_path / "r", {trainer.learner.name: trainer.learner}, trainer.cfg)
    assert "Flagged" in text
    assert (tmp_path / "r" / "figure3_learning_curve.png").stat().st_size > 0
    cell = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert "NaN" not in json.dumps(cell) and "Infinity" not in json.dumps(cell)  # strict JSON: null


def test_a_diverging_rl_run_stops_with_exit_1(cli, tmp_path):
    code, _, err = cli("rl", "train", "nav2d", "--inner-lr", "1e30", "--out-dir", tmp_path, *RL_SMALL)
    assert code == 1 and "Traceback" not in err, err
    assert "diverged at step 1" in err and "surrogate loss" in err and "--inner-lr 1e+30" in err
    assert not (tmp_path / "rl-nav2d-maml-trpo" / "checkpoint.safetensors").exists()


# --------------------------------------------------------------------------------------
# Non-finite settings are refused by flag name, exit 2.


@pytest.mark.parametrize("args, flag", [
    (["train", "sinusoid", "--inner-lr", "inf"], "--inner-lr"),
    (["train", "sinusoid", "--meta-lr", "nan"], "--meta-lr"),
    (["train", "sinusoid", "--memory-budget", "inf"], "--memory-budget"),
    (["rl", "train", "nav2d", "--init-std", "inf"], "--init-std"),
    (["rl", "train", "nav2d", "--eval-lrs", "0.1", "inf"], "--eval-lrs"),
    (["rl", "train", "nav2d", "--action-scale", "inf"], "--action-scale"),
    (["rl", "train", "nav2d", "--max-kl", "inf"], "--max-kl"),
])
def test_non_finite_settings_exit_2_naming_the_flag(cli, tmp_path, args, flag):
    # a short run's settings, so that a setting let through trains briefly and fails the test, not hangs it
    short = flags({**SMALL, "iterations": 1}) if args[0] == "train" else [*RL_SMALL, "--iterations", "1"]
    code, _, err = cli(*args, "--out-dir", tmp_path, *short)
    assert code == 2 and flag in err and "finite" in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("cls", [config.TrainConfig, rlconfig.RLConfig])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_setting_refuses_non_finite_values(cls, bad):
    hints = typing.get_type_hints(cls)
    floats = [f.name for f in dataclasses.fields(cls) if hints[f.name] in (float, tuple[float, ...])]
    assert {"inner_lr", "meta_lr"} <= set(floats) or {"inner_lr", "init_std", "eval_lrs"} <= set(floats)
    for name in floats:
        value = (1.0, bad) if hints[name] is not float else bad
        with pytest.raises(config.ConfigError, match=f"--{name.replace('_', '-')} .*finite"):
            cls(**{name: value})


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_option_refuses_non_finite_values(bad):
    """The plug-ins' options (mamlkit.base.options) too, whichever plug-in reads them."""
    from mamlkit.base.options import option_classes, users

    seen = set()
    for cls in option_classes(config.TrainConfig.choices.kinds):
        hints = typing.get_type_hints(cls)
        kind, owner = users(cls)[0]
        for f in dataclasses.fields(cls):
            if hints[f.name] in (float, tuple[float, ...]):
                seen.add(f.name)
                value = (1.0, bad) if hints[f.name] is not float else bad
                with pytest.raises(config.ConfigError, match=f"--{f.name.replace('_', '-')} .*finite"):
                    config.TrainConfig(**{kind: owner, f.name: value})
    assert {"reptile_inner_lr", "imaml_lambda", "finetune_rate_scale", "task_split"} <= seen


# --------------------------------------------------------------------------------------
# `mamlkit adapt` inputs beyond float32: finite as read, infinite once cast; named, exit 2.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A regression run (vector inputs) and a CSV-task regression run."""
    from mamlkit.cli import main

    root = tmp_path_factory.mktemp("runs")
    train.fit(train.new_trainer(small_cfg(root, iterations=2, val_tasks=0), root / "sin"))
    rng = random.Random(0)
    rows = [[f"s{t:02d}", f"{(x := rng.uniform(-1, 1)):.5f}", ["red", "green"][i % 2], f"{t + 2 * x:.5f}"]
            for t in range(20) for i in range(12)]
    table = write_csv(root / "reg.csv", ["site", "x", "colour", "y"], rows)
    assert main(["train", "csv", "--path", str(table), "--target", "y", "--task-column", "site", "--run-name", "csv",
                 "--out-dir", str(root), "--iterations", "3", "--k-shot", "5", "--k-query", "5", "--threads", "1",
                 "--no-progress", "--no-tensorboard", "--eval-tasks", "4", "--val-tasks", "0"]) == 0
    return {"sin": root / "sin", "csv": root / "csv"}


SIN_OK_S, SIN_OK_Q = (["x", "y"], [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]), (["x"], [[0.1], [0.2]])
CSV_OK_S = (["x", "colour", "y"], [[0.1, "red", 1], [0.2, "green", 2], [0.3, "red", 3]])
CSV_OK_Q = (["x", "colour"], [[0.1, "red"], [0.2, "green"]])


@pytest.mark.parametrize("run, support, query, named", [
    ("sin", (["x", "y"], [[0.1, 0.2], [1e39, 0.4], [0.5, 0.6]]), SIN_OK_Q, ["s.csv", "line 3", "'x'", "float32"]),
    ("sin", SIN_OK_S, (["x"], [[0.1], [1e39]]), ["q.csv", "line 3", "'x'", "float32"]),
    ("sin", (["x", "y"], [[0.1, 0.2], [0.3, 1e39], [0.5, 0.6]]), SIN_OK_Q, ["s.csv", "line 3", "'y'", "float32"]),
    ("sin", (["x", "y"], [[0.1, 0.2], [0.3, 1e38], [0.5, 0.6]]), SIN_OK_Q, ["overflows float32", "1e+38"]),
    ("csv", (["x", "colour", "y"], [[0.1, "red", 1], [1e39, "green", 2], [0.3, "red", 3]]), CSV_OK_Q,
     ["s.csv", "line 3", "'x'", "float32"]),
    ("csv", CSV_OK_S, (["x", "colour"], [[0.1, "red"], [1e39, "green"]]), ["q.csv", "line 3", "'x'", "float32"]),
    ("csv", (["x", "colour", "y"], [[0.1, "red", 1], [0.2, "green", 2], [0.3, "red", 1e38]]), CSV_OK_Q,
     ["overflows float32"]),
])
def test_adapt_inputs_beyond_float32_exit_2_naming_them(cli, runs, tmp_path, run, support, query, named):
    s, q = write_csv(tmp_path / "s.csv", *support), write_csv(tmp_path / "q.csv", *query)
    code, out, err = cli("adapt", runs[run], "--support", s, "--query", q)
    assert code == 2 and "Traceback" not in err and "nan" not in out, (code, out, err)
    for text in named:
        assert text in err, (text, err)


def test_api_refuses_tensors_beyond_float32_after_the_cast(runs):
    import mamlkit

    learner = mamlkit.load(runs["sin"])
    x = torch.tensor([[0.1], [1e39], [0.3]], dtype=torch.float64)
    y = torch.tensor([[0.1], [0.2], [0.3]], dtype=torch.float64)
    with pytest.raises(mamlkit.UserError, match=r"support inputs .* float32 .*row\(s\) 1,"):
        learner.adapt(x, y)
    model = learner.adapt(x[[0, 2]], y[[0, 2]])
    with pytest.raises(mamlkit.UserError, match=r"query inputs .*row\(s\) 1,"):
        model.predict(x)
    assert torch.isfinite(model.predict(x[[0, 2]]).values).all()


# --------------------------------------------------------------------------------------
# `--output p.JSON` is JSON: the suffix is read one way, case-blind, for the check and the write.


@pytest.mark.parametrize("name, kind", [("p.JSON", "json"), ("p.Json", "json"), ("p.CSV", "csv"), ("p.json", "json")])
def test_output_suffix_is_read_case_blind(cli, runs, tmp_path, name, kind):
    s, q = write_csv(tmp_path / "s.csv", *SIN_OK_S), write_csv(tmp_path / "q.csv", *SIN_OK_Q)
    code, _, err = cli("adapt", runs["sin"], "--support", s, "--query", q, "--output", tmp_path / name)
    assert code == 0, err
    text = (tmp_path / name).read_text()
    if kind == "json":
        rows = json.loads(text)
        assert [r["x0"] for r in rows] == [0.1, 0.2]
    else:
        assert text.splitlines()[0] == "x0,prediction" and len(text.splitlines()) == 3


# --------------------------------------------------------------------------------------
# The log rows of a resumed run equal an uninterrupted run's, also from a step between two rows.


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss")} for r in rows if r["split"] == "train"]


def test_log_rows_after_a_resume_between_rows_equal_the_uninterrupted_runs(cli, tmp_path):
    cfg = small_cfg(tmp_path, dtype="float64", val_tasks=0)
    straight = train.fit(train.new_trainer(cfg, tmp_path / "straight"))
    train.fit(train.new_trainer(cfg, tmp_path / "split"), stop_at=6)  # log_every 4: the window holds step 5, 6
    code, _, err = cli("train", "--resume", tmp_path / "split")
    assert code == 0, err
    expected = train_rows(tmp_path / "straight")
    assert [r["step"] for r in expected] == [4, 8, 12] and straight.step == 12
    assert train_rows(tmp_path / "split") == expected  # floats exactly
    assert checkpoint.load(tmp_path / "split")[1]["log_window"] == {}  # the run's last row closed its window


def test_log_rows_after_a_stop_signal_between_rows_equal_the_uninterrupted_runs(cli, tmp_path, monkeypatch):
    common = ["--out-dir", tmp_path, "--dtype", "float64", *flags({**SMALL, "val_tasks": 0})]
    assert cli("train", "sinusoid", "--run-name", "straight", *common)[0] == 0
    real = train.meta_lr_at

    def stop_at_step_6(cfg, step):  # SIGTERM to this process as iteration 7 starts (the handler is installed)
        if step == 6 and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, step)

    monkeypatch.setattr(train, "meta_lr_at", stop_at_step_6)
    code, _, err = cli("train", "sinusoid", "--run-name", "split", *common)
    assert code == 143 and checkpoint.load(tmp_path / "split")[1]["step"] == 6, err
    monkeypatch.setattr(train, "meta_lr_at", real)
    assert cli("train", "--resume", tmp_path / "split")[0] == 0
    assert train_rows(tmp_path / "split") == train_rows(tmp_path / "straight")


def test_rl_log_rows_after_a_resume_between_rows_equal_the_uninterrupted_runs(tmp_path):
    from mamlkit.rl import train as rl_train

    cfg = rlconfig.RLConfig(hidden_sizes=(5,), meta_batch=3, traj_per_task=4, horizon=6, dtype="float64",
                            iterations=6, log_every=4, val_every=0, checkpoint_every=100, progress=False,
                            out_dir=str(tmp_path))
    rl_train.fit(rl_train.new_trainer(cfg, tmp_path / "straight"))
    rl_train.fit(rl_train.new_trainer(cfg, tmp_path / "split"), stop_at=3)  # the window holds steps 1-3
    rl_train.fit(rl_train.load_trainer(tmp_path / "split"))
    rows = {run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "split")}
    keep = ("step", "return_pre", "return_post", "loss")
    expected = [{k: r[k] for k in keep} for r in rows["straight"] if r["split"] == "train"]
    assert [r["step"] for r in expected] == [4, 6]
    assert [{k: r[k] for k in keep} for r in rows["split"] if r["split"] == "train"] == expected
