"""Each plug-in owns its options (mamlkit/base/options.py): every flag has one owner, the flags and their help
are generated from the registry, an option of a plug-in not chosen is refused wherever a config is made, runs
stored when every option was a field of every config still load, and `X | None` options parse as `X`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import config_flags as flags

from mamlkit import checkpoint, config
from mamlkit.assemble import config_of
from mamlkit.base import options as plugins
from mamlkit.flags import add_config_flags
from mamlkit.presets import preset_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = config.TrainConfig.choices.kinds  # the plug-in kinds whose options `mamlkit train` takes
SMALL = dict(iterations=2, log_every=1, val_every=2, val_tasks=2, checkpoint_every=100, progress=False,
             tensorboard=False, hidden_sizes=(8, 8), meta_batch=2, eval_tasks=4, eval_query=5, eval_steps=(0, 1),
             eval_shots=(5,), strategy="loop", threads=1, compare_pretrained=False)

# A config.json as the code before the options moved wrote it: every one of the 83 keys, those of plug-ins the
# run did not choose at their defaults (omniglot, mamlpp, n_way 20, filters 32, msl_epochs 3).
OLD_CONFIG = json.loads(
    '{"task": "omniglot", "algo": "mamlpp", "loss": "mse", "model": "", "model_args": "", "output": "", "adapt": [], '
    '"hidden_sizes": [40, 40], "filters": 32, "pool": false, "image_size": 28, "bn_mode": "transductive", "n_way": 20, '
    '"k_shot": 10, "k_query": 10, "inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": null, "first_order": false, '
    '"meta_batch": 25, "meta_lr": 0.001, "iterations": 70000, "strategy": "auto", "chunk_size": 0, '
    '"memory_budget": 0.0, "checkpoint_inner": false, "device": "cpu", "dtype": "float32", "threads": 0, '
    '"tune_malloc": true, "fast_kernels": true, "backend": "auto", "dist_timeout": 600, "seed": 0, "data_root": "", '
    '"trust_checksum": false, "split": "paper", "rotations": "per_task", "path": "", "task_column": "", "target": "", '
    '"features": [], "kind": "regression", "fill": "none", "max_categories": 20, "task_split": [0.7, 0.15, 0.15], '
    '"small_tasks": "skip", "channels": 3, "small_classes": "skip", "encoder_mode": "frozen", "finetune_layers": 1, '
    '"finetune_rate_scale": 1.0, "text_max_tokens": 24, "text_per_intent": 100, "out_dir": "runs", "run_name": "", '
    '"log_every": 100, "val_every": 2000, "val_tasks": 100, "checkpoint_every": 5000, "progress": true, '
    '"tensorboard": true, "eval_tasks": 600, "eval_steps": [0, 1, 5, 10], "eval_shots": [5, 10, 20], '
    '"eval_query": 100, "compare_pretrained": true, "baseline_lrs": [], "preset": "", "meta_optimizer": "adam", '
    '"meta_lr_schedule": "constant", "min_meta_lr": 0.0, "msl": true, "msl_epochs": 3, "lslr": true, '
    '"per_step_bn": true, "first_order_epochs": 0, "epoch_iterations": 500, "reptile_inner_optimizer": "sgd", '
    '"reptile_inner_lr": 0.02, "reptile_inner_steps": 5, "imaml_lambda": 1.0, "cg_steps": 5}')


def test_every_flag_has_exactly_one_owner():
    generic = [f.name for f in dataclasses.fields(config.TrainConfig) if f.name != "options"]
    owned = [f.name for cls in plugins.option_classes(TRAIN) for f in dataclasses.fields(cls)]
    names = generic + owned
    assert len(names) == len(set(names)) == 84  # the 84 keys of the flat config, each declared once
    for cls in plugins.option_classes(TRAIN):
        assert plugins.users(cls), cls  # a class no plug-in lists would be a flag without effect
        assert all(plugins.owner(f.name) is cls for f in dataclasses.fields(cls))
    assert set(names) == set(config.field_types())

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Again:
        n_way: int = plugins.option(5, plugins.TASK, "classes per task, declared a second time")

    with pytest.raises(ValueError, match="'n_way' of .*Again is already declared by EpisodeOptions"):
        plugins.register_options("task", "again", Again)


def test_each_plugins_options_are_flags_with_their_owners_and_help():
    parser = argparse.ArgumentParser(formatter_class=lambda prog: argparse.HelpFormatter(prog, width=10_000))
    add_config_flags(parser)
    text = " ".join(parser.format_help().split())
    for (kind, name), classes in plugins._REGISTRY.items():
        if kind not in TRAIN:  # `mamlkit rl train`'s (tests/test_rl_options.py)
            continue
        for cls in classes:
            owners = ", ".join(n for _, n in plugins.users(cls, TRAIN))
            assert name in owners.split(", ")
            for f in dataclasses.fields(cls):
                at = re.search(rf" --{f.name.replace('_', '-')}[ ,]", text).start()
                assert f"{owners}: {' '.join(f.metadata['help'].split())}" in text[at:at + 300], (name, f.name)
    assert "mamlpp: multi-step loss with annealed per-step weights" in text
    assert "maml, fomaml, metasgd, pretrain: adapt only parameters" in text


def test_an_option_of_a_plugin_not_chosen_is_refused_from_python():
    with pytest.raises(config.ConfigError, match=r"--filters has no effect on the sinusoid task family.*"
                                                 r"--eval-query, --eval-shots, --hidden-sizes"):
        config.TrainConfig(filters=64)  # even at its default: the key was given
    with pytest.raises(config.ConfigError, match="--msl has no effect on --algo maml"):
        config.from_dict({"msl": True})
    cfg = config.TrainConfig(algo="mamlpp", msl=False)
    assert cfg.msl is False and cfg.to_dict()["msl"] is False
    with pytest.raises(config.ConfigError, match="--reptile-inner-lr has no effect on --algo mamlpp"):
        cfg.replace(reptile_inner_lr=0.5)
    # a change of algorithm drops the options only the old one read, and keeps the shared ones
    maml = cfg.replace(algo="maml", first_order=True)
    assert maml.first_order is True and "msl" not in maml.to_dict() and maml.msl is True  # msl reads as its default
    assert config.TrainConfig(algo="fomaml", adapt=("0.*",)).adapt == ("0.*",)
    with pytest.raises(config.ConfigError, match=r"omniglott task family \(no plug-in is registered under that name"):
        config.TrainConfig(task="omniglott", n_way=3)
    # a plug-in's check across generic fields: MAML++'s own, not a gate on its name in the config
    with pytest.raises(config.ConfigError, match="mamlpp needs inner_steps >= 1"):
        config.TrainConfig(algo="mamlpp", inner_steps=0)
    assert config.TrainConfig(algo="maml", inner_steps=0).inner_steps == 0
    # a family's derived value: a CSV task's loss from its kind, set while the config is built
    assert config.TrainConfig(task="csv", kind="classification").loss == "cross_entropy"
    assert config.TrainConfig(task="csv", kind="classification").replace(kind="regression").loss == "mse"
    with pytest.raises(config.ConfigError, match="--adapt has no effect on --algo anil"):
        config.TrainConfig(algo="anil", adapt=("0.*",))


def test_a_presets_options_of_another_algorithm_are_dropped_but_an_override_is_checked():
    cfg = preset_config("omniglot-5w1s-mamlpp", {"algo": "maml"})
    assert cfg.algo == "maml" and "msl" not in cfg.to_dict() and cfg.n_way == 5
    with pytest.raises(config.ConfigError, match="--msl-epochs has no effect on --algo maml"):
        preset_config("omniglot-5w1s-mamlpp", {"algo": "maml", "msl_epochs": 3})


def test_an_option_of_a_plugin_not_chosen_is_refused_by_the_cli_and_yaml(cli, tmp_path):
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--no-msl")
    assert code == 2 and "--msl has no effect on --algo maml" in err and "Traceback" not in err
    yaml = tmp_path / "c.yaml"
    yaml.write_text("filters: 64\n")  # at its default, but given
    code, _, err = cli("train", "sinusoid", "--config", yaml, "--out-dir", tmp_path)
    assert code == 2 and "--filters has no effect on the sinusoid task family" in err
    assert not list(tmp_path.glob("sinusoid*"))


def test_an_option_of_a_plugin_not_chosen_is_refused_on_resume(cli, tmp_path):
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", *flags(SMALL))
    assert code == 0, err
    code, _, err = cli("train", "--resume", tmp_path / "r", "--n-way", "5")
    assert code == 2 and "--n-way has no effect on the sinusoid task family" in err and "Traceback" not in err
    yaml = tmp_path / "c.yaml"
    yaml.write_text("cg_steps: 3\n")
    code, _, err = cli("train", "--resume", tmp_path / "r", "--config", yaml)
    assert code == 2 and "--cg-steps has no effect on --algo maml" in err


def test_a_config_stored_with_every_flat_key_loads():
    cfg = config_of({"config": OLD_CONFIG}, "old/config.json")
    assert cfg == config.TrainConfig(task="omniglot", algo="mamlpp", n_way=20, filters=32, msl_epochs=3)
    stored = cfg.to_dict()
    assert {k: v for k, v in stored.items() if k in OLD_CONFIG} == {k: v for k, v in OLD_CONFIG.items() if k in stored}
    assert set(stored) - set(OLD_CONFIG) == {"test_guard"} and not cfg.test_guard  # added since: its default
    assert {"reptile_inner_lr", "path", "hidden_sizes", "adapt"}.isdisjoint(cfg.to_dict())
    # an unread option away from its default: the stored run would change meaning, so it is refused
    with pytest.raises(checkpoint.CheckpointError, match="reptile_inner_lr=0.5.*--algo mamlpp"):
        config_of({"config": {**OLD_CONFIG, "reptile_inner_lr": 0.5}}, "old/config.json")
    # a checkpoint shipped before the move (its config holds all the flat keys)
    _, state = checkpoint.load(ROOT / "mamlkit" / "assets" / "omniglot-5w1s.safetensors")
    assert {"hidden_sizes", "msl", "kind"} <= set(state["config"])  # options omniglot and maml do not read
    shipped = config_of(state, "omniglot-5w1s")
    assert shipped.task == "omniglot" and shipped.n_way == state["config"]["n_way"]


def test_a_float_or_none_option_parses_as_a_float():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Scaled:
        scale_floor: float | None = plugins.option(None, plugins.INNER, "lowest scale (none: no floor)")

    plugins.register_options("algo", "scaled-test", Scaled)
    try:
        parser = argparse.ArgumentParser()
        add_config_flags(parser)
        assert parser.parse_args(["--scale-floor", "0.25"]).scale_floor == 0.25
        assert parser.parse_args(["--scale-floor", "none"]).scale_floor is None
        assert parser.parse_args(["--test-inner-steps", "3"]).test_inner_steps == 3
        assert config.from_dict({"algo": "scaled-test", "scale_floor": "0.5"}).scale_floor == 0.5
    finally:
        plugins.unregister_options("algo", "scaled-test")
    assert plugins.owner("scale_floor") is None


@pytest.mark.parametrize("algo", ["metasgd", "boil", "mamlpp", "maml"])
def test_checkpoint_inner_is_an_option_of_every_unrolled_algorithm_with_identical_float64_gradients(algo):
    """Its per-task function is the unrolled inner loop, so recomputing it in the backward changes nothing:
    loss and every meta-gradient (the rates' too) equal bit for bit. Meta-SGD refused the flag before."""
    from mamlkit.algorithms import ALGORITHMS
    from mamlkit.exec.executor import Executor
    from mamlkit.tasks import Sinusoid, task_generator

    cfg = config.TrainConfig(algo=algo, checkpoint_inner=True, strategy="loop", dtype="float64", inner_steps=3,
                             inner_lr=0.05, hidden_sizes=(16,))
    assert cfg.checkpoint_inner is True
    with pytest.raises(config.ConfigError, match="checkpoint_inner works with --strategy auto, loop or threads"):
        config.TrainConfig(algo=algo, checkpoint_inner=True, strategy="vmap")
    batch = Sinusoid().sample(4, task_generator(0, "test", 0)).to(dtype=torch.float64)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
        run = cfg.replace(checkpoint_inner=checkpointed)
        learner = ALGORITHMS[algo](model, run, Executor.from_config(run, model))
        assert learner.executor.checkpoint_inner is checkpointed
        loss, _ = learner.meta_loss(batch)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in learner.meta_parameters().items()
                                        if p.grad is not None}))
    (loss_a, a), (loss_b, b) = results
    assert torch.equal(loss_a, loss_b) and a.keys() == b.keys() and len(a) >= 4
    assert all(torch.equal(a[k], b[k]) for k in a), "the checkpointed inner loop changed the meta-gradient"


def test_checkpoint_inner_is_refused_where_there_is_no_unrolled_loop():
    for algo in ("anil", "reptile", "imaml", "pretrain"):
        with pytest.raises(config.ConfigError, match=f"--checkpoint-inner has no effect on --algo {algo}"):
            config.TrainConfig(algo=algo, checkpoint_inner=True)
