"""Trainer, checkpoints, config and CLI: determinism, exact resume, clear errors with exit code 2."""

import json

import pytest
import torch
from helpers import config_flags
from safetensors.torch import save_file

from mamlkit import checkpoint, config
from mamlkit.loop import train
from mamlkit.presets import preset_config

# One strategy for every run: auto's timed choice (vmap or whole tasks on threads, equal up to rounding) would
# make two runs' bitwise comparison depend on the machine's load.
SMALL = dict(iterations=12, log_every=4, val_every=6, val_tasks=8, checkpoint_every=100, progress=False,
             tensorboard=False, hidden_sizes=(8, 8), meta_batch=4, eval_tasks=10, eval_query=10,
             eval_steps=(0, 1, 2), eval_shots=(5,), test_inner_steps=2, strategy="vmap")


def small_cfg(tmp_path, **kw):
    return preset_config("sinusoid", {**SMALL, "out_dir": str(tmp_path), **kw})


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.learner.meta_parameters().items()}


def test_training_is_deterministic_and_reduces_loss(tmp_path):
    a = train.fit(train.new_trainer(small_cfg(tmp_path, run_name="a"), tmp_path / "a"))
    b = train.fit(train.new_trainer(small_cfg(tmp_path, run_name="b"), tmp_path / "b"))
    for k, v in params_of(a).items():
        assert torch.equal(v, params_of(b)[k]), k
    c = train.fit(train.new_trainer(small_cfg(tmp_path, run_name="c", seed=1), tmp_path / "c"))
    assert not torch.equal(params_of(a)["0.weight"], params_of(c)["0.weight"])


def test_global_rng_is_untouched_by_training(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train.fit(train.new_trainer(small_cfg(tmp_path), tmp_path / "r"))
    assert torch.equal(torch.rand(3), expected)


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = small_cfg(tmp_path)
    straight = train.fit(train.new_trainer(cfg, tmp_path / "straight"))
    first = train.fit(train.new_trainer(cfg, tmp_path / "split"), stop_at=5)
    train.save_checkpoint(first, tmp_path / "split" / "checkpoint.safetensors")
    del first
    resumed = train.load_trainer(tmp_path / "split")
    assert resumed.step == 5
    train.fit(resumed)
    for k, v in params_of(straight).items():
        assert torch.equal(v, params_of(resumed)[k]), k
    # Adam's moments too, so the next step would also agree
    s1, s2 = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    # the metrics log holds each step once
    steps = [json.loads(x)["step"] for x in open(tmp_path / "split" / "metrics.jsonl") if '"train"' in x]
    assert steps == sorted(set(steps))


def test_checkpoint_holds_config_and_is_safetensors(tmp_path):
    trainer = train.fit(train.new_trainer(small_cfg(tmp_path), tmp_path / "run"))
    tensors, state = checkpoint.load(tmp_path / "run" / "checkpoint.safetensors")
    assert state["config"]["inner_lr"] == 0.001 and state["step"] == 12 and state["algo"] == "maml"
    assert state["model_spec"] == {"name": "mlp", "in_features": 1, "hidden": [8, 8], "out_features": 1}
    assert torch.equal(tensors["meta/0.weight"], trainer.learner.model[0].weight.detach())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config.from_dict(saved) == trainer.cfg
    assert not list((tmp_path / "run").glob("*.tmp"))  # atomic writes leave no temporaries


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="not a safetensors file"):
        checkpoint.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="not a mamlkit checkpoint"):
        checkpoint.load(tmp_path / "other.safetensors")
    checkpoint.save(tmp_path / "future.safetensors", {"w": torch.zeros(2)}, {})
    from safetensors.torch import load_file
    save_file(load_file(str(tmp_path / "future.safetensors")), str(tmp_path / "future.safetensors"),
              metadata={"format": "mamlkit", "format_version": "99", "state": "{}"})
    with pytest.raises(checkpoint.CheckpointError, match="newer"):
        checkpoint.load(tmp_path / "future.safetensors")


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(config.ConfigError, match=r"unknown config key\(s\): inner_lrr.*Valid keys: task"):
        config.from_dict({"inner_lrr": 0.1})
    with pytest.raises(config.ConfigError, match="inner_steps must be >= 0"):
        config.from_dict({"inner_steps": -1})
    with pytest.raises(config.ConfigError, match="meta_batch must be of type int"):
        config.from_dict({"meta_batch": "many"})
    with pytest.raises(config.ConfigError, match="unknown preset 'nope'"):
        preset_config("nope")
    with pytest.raises(Exception, match="frozen|cannot assign"):
        config.TrainConfig().inner_lr = 1.0  # type: ignore[misc]


def test_cli_train_eval_smoke(cli, tmp_path):
    code, out, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "smoke", *config_flags(SMALL))
    assert code == 0, err
    run = tmp_path / "smoke"
    for name in ("checkpoint.safetensors", "config.json", "metrics.jsonl", "metrics.csv", "eval.md", "eval.json",
                 "figure2_fits.png", "figure3_learning_curve.png", "pretrained/checkpoint.safetensors"):
        assert (run / name).exists(), name
    assert "| 5 | 1 |" in out and "0.67" in out  # our 1-step row beside the paper's 1-step figure
    result = json.loads((run / "eval.json").read_text())
    assert set(result["mse"]) == {"maml", "pretrain"}
    table = (run / "eval.md").read_text()
    (run / "eval.md").unlink()
    code, out2, err = cli("eval", run, "--eval-tasks", "10", "--overwrite")  # eval.json and figures are there
    assert code == 0, err
    assert (run / "eval.md").read_text() == table  # the same fixed test tasks give the same table
    assert table in out2
    # resuming a finished run with more iterations continues it
    code, _, err = cli("train", "--resume", run, "--iterations", "14", "--no-compare-pretrained", "--no-progress")
    assert code == 0, err
    assert checkpoint.load(run)[1]["step"] == 14


@pytest.mark.parametrize("args, message", [
    (["train", "sinusoid", "--inner-steps", "-2"], "inner_steps must be >= 0"),
    (["train", "nosuchpreset"], "unknown preset"),
    (["train"], "name a preset"),
    (["eval", "/nonexistent/run"], "checkpoint not found"),
    (["train", "--resume", "/nonexistent/run"], "checkpoint not found"),
])
def test_cli_user_errors_exit_2_without_traceback(cli, args, message):
    code, out, err = cli(*args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_cli_bad_yaml_and_flags_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner_lr: 0.1\nmeta_btach: 3\n")
    code, _, err = cli("train", "sinusoid", "--config", bad, "--out-dir", tmp_path)
    assert code == 2 and "meta_btach" in err and "Valid keys" in err
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors also exit 2
        cli("train", "sinusoid", "--inner-lr", "fast")
    assert e.value.code == 2


def test_cli_refuses_to_overwrite_a_run(cli, tmp_path):
    run = tmp_path / "sinusoid-maml"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"x")
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path)
    assert code == 2 and "--resume" in err


def test_eval_report_counts_diverged_tasks_instead_of_printing_nan():
    from mamlkit.eval.evaluate import EvalResult

    r = EvalResult(torch.tensor([[1.0, 0.5], [1.0, float("nan")], [1.0, 0.7]]), torch.zeros(3, 2))
    assert r.diverged(1) == 1 and r.diverged(0) == 0
    assert r.loss_text(0) == "1.000 ± 0.000 (median 1.000)"
    assert r.loss_text(1) == "— ± — (median —) ⚠ not finite on 1/3 tasks"
    assert r.cell(1) == {"mean": None, "ci95": None, "median": None, "flag": "not finite on 1/3 tasks"}


def test_baseline_step_size_is_the_validation_argmin_and_is_kept(tmp_path):
    cfg = small_cfg(tmp_path, algo="pretrain", run_name="pre", dtype="float64")
    trainer = train.fit(train.new_trainer(cfg, tmp_path / "pre"))
    rates = (1e-3, 0.05, 1e3)
    expected = {}
    for rate in rates:  # each rate on its own, from the checkpoint: what the tuner must have seen
        alone = train.load_trainer(tmp_path / "pre", resume=False)
        alone.learner = train.build(alone.cfg.replace(inner_lr=rate), checkpoint.load(tmp_path / "pre")[0])[0]
        expected[rate] = train.validate(alone)["loss"]
    tuned, losses = train.tune_inner_lr(trainer, rates)
    finite = {r: v for r, v in expected.items() if v == v and v != float("inf")}
    best = min(finite, key=finite.get)
    assert best == 0.05 and tuned.cfg.inner_lr == 0.05  # 1e3 blows up; 1e-3 barely moves in 2 steps
    for rate in finite:
        assert losses[rate] == pytest.approx(expected[rate], rel=1e-12)
    assert losses[1e3] == float("inf") or losses[1e3] > 10 * losses[0.05]
    state = checkpoint.load(tmp_path / "pre")[1]
    assert state["config"]["inner_lr"] == 0.05 and state["config"]["baseline_lrs"] == []
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["inner_lr"] == 0.05
    again = train.load_trainer(tmp_path / "pre")
    assert again.cfg.inner_lr == 0.05 and train.tune_inner_lr(again, again.cfg.baseline_lrs)[1] == {}


def test_baseline_lrs_without_a_baseline_is_refused(cli, tmp_path):
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--no-compare-pretrained", "--baseline-lrs", "0.01")
    assert code == 2 and "--baseline-lrs" in err and "Traceback" not in err
