"""Meta-RL's config holds the options of the plug-ins it chooses (mamlkit/base/options.py): its RL algorithm's
(TRPO's) and its environment family's (Meta-World's reward_version). Every RL flag has one owner; an option the
chosen algorithm and family do not read is refused (exit 2, naming its owner) from flags, a --config file and
a resume; a config.json written when every option was a field of every RL config loads; and an environment
family registered from outside the package (docs/DEVELOPING.md's: one file, its registry line included) is usable
by `mamlkit rl train` without editing mamlkit."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from mamlkit import config
from mamlkit.base import options as plugins
from mamlkit.rl import families
from mamlkit.rl.config import RLConfig, field_types, from_dict, from_stored

RL = RLConfig.choices.kinds
# A config.json of `mamlkit rl train nav2d` as the code before the options moved wrote it: all 40 keys, Meta-World's
# reward_version among them.
OLD_CONFIG = json.loads(
    '{"env": "nav2d", "algo": "maml-trpo", "hidden_sizes": [100, 100], "init_std": 1.0, "horizon": 0, '
    '"action_scale": 10.0, "traj_per_task": 20, "seed": 0, "reward_version": "v2", "gamma": 0.99, "gae_lambda": 1.0, '
    '"estimator": "reinforce", "inner_lr": 0.1, "inner_steps": 1, "first_order": false, "meta_batch": 20, '
    '"iterations": 200, "max_kl": 0.01, "cg_iters": 10, "cg_damping": 1e-05, "ls_steps": 15, "ls_ratio": 0.8, '
    '"fisher_tasks": 0, "fisher_fraction": 0.2, "fast_fisher": true, "dtype": "float32", "threads": 1, '
    '"dist_timeout": 600, "out_dir": "runs", "run_name": "", "log_every": 1, "checkpoint_every": 10, '
    '"progress": true, "val_every": 10, "val_tasks": 20, "eval_tasks": 40, "eval_traj": 0, '
    '"eval_lrs": [0.1, 0.05, 0.05], "baselines": true, "pretrain_iterations": 100}')
TINY = ["--hidden-sizes", "4", "--meta-batch", "2", "--traj-per-task", "2", "--horizon", "3", "--iterations", "1",
        "--no-progress", "--no-baselines", "--val-every", "0", "--eval-tasks", "2", "--eval-traj", "1"]


def test_every_rl_flag_has_exactly_one_owner():
    generic = [f.name for f in dataclasses.fields(RLConfig) if f.name != "options"]
    owned = [f.name for cls in plugins.option_classes(RL) for f in dataclasses.fields(cls)]
    names = generic + owned
    assert len(names) == len(set(names)) == 40  # the 40 keys of the flat RL config, each declared once
    assert set(names) == set(field_types()) == set(OLD_CONFIG)
    assert {"max_kl", "fast_fisher", "reward_version"} <= set(owned)
    for cls in plugins.option_classes(RL):
        assert plugins.users(cls, RL), cls
        assert all(plugins.owner(f.name, RL) is cls for f in dataclasses.fields(cls))
    # the two commands' plug-ins are apart: `mamlkit train` takes no RL option, `rl train` no supervised one
    assert not set(owned) & set(config.field_types())
    assert plugins.owner("max_kl", config.TrainConfig.choices.kinds) is None and plugins.owner("msl", RL) is None
    with pytest.raises(config.ConfigError, match="unknown config key.*max_kl"):
        config.TrainConfig(max_kl=0.1)
    with pytest.raises(config.ConfigError, match="unknown rl config key.*msl"):
        RLConfig(msl=True)


def test_options_read_as_attributes_and_write_as_flat_keys():
    cfg = RLConfig(max_kl=0.02, fast_fisher=False)
    assert (cfg.max_kl, cfg.fast_fisher, cfg.reward_version) == (0.02, False, "v2")  # reward_version: its default
    assert "reward_version" not in cfg.to_dict() and cfg.to_dict()["max_kl"] == 0.02
    mw = cfg.replace(env="ml1-reach", reward_version="v1")
    assert (mw.reward_version, mw.max_kl, mw.episode_len, mw.tasks_per_batch, mw.test_traj) == ("v1", 0.02, 500, 20, 8)
    back = mw.replace(env="cheetah-dir")  # a change of family drops the option only Meta-World reads
    assert "reward_version" not in back.to_dict() and back.tasks_per_batch == 40 and back.env_action_scale == 10.0
    assert from_dict(mw.to_dict()) == mw
    with pytest.raises(config.ConfigError, match="--max-kl .*finite"):
        RLConfig(max_kl=float("inf"))
    with pytest.raises(config.ConfigError, match="max_kl must be > 0"):
        RLConfig(max_kl=0.0)


@pytest.mark.parametrize("source", ["flag", "yaml"])
def test_an_option_the_environment_family_does_not_read_is_refused_naming_its_owner(source, cli, tmp_path):
    if source == "flag":
        code, _, err = cli("rl", "train", "nav2d", "--reward-version", "v1", "--out-dir", tmp_path)
    else:
        (tmp_path / "c.yaml").write_text("reward_version: v2\n")  # at its default, but given
        code, _, err = cli("rl", "train", "nav2d", "--config", tmp_path / "c.yaml", "--out-dir", tmp_path)
    assert code == 2 and "Traceback" not in err
    assert ("--reward-version has no effect on the nav2d environment family, so it is refused; remove it. Its own "
            "settings of this kind: none. --reward-version applies to Meta-World environments only") in err
    assert not (tmp_path / "rl-nav2d-maml-trpo").exists()


def test_an_option_is_refused_on_a_resume_naming_its_owner(cli, tmp_path):
    from mamlkit.rl import train

    trainer = train.new_trainer(RLConfig(hidden_sizes=(4,), meta_batch=2, out_dir=str(tmp_path)), tmp_path / "run")
    train.save_checkpoint(trainer, tmp_path / "run" / "checkpoint.safetensors")
    code, _, err = cli("rl", "train", "--resume", tmp_path / "run", "--reward-version", "v2")
    assert code == 2 and "Traceback" not in err
    assert "--reward-version has no effect on the nav2d environment family" in err and "Meta-World" in err
    code, _, err = cli("rl", "train", "--resume", tmp_path / "run", "--max-kl", "0.02")  # read, but defines the run
    assert code == 2 and "cannot change max_kl when resuming" in err


def test_an_old_config_json_with_every_key_loads():
    cfg = from_stored(OLD_CONFIG)
    assert cfg == RLConfig(action_scale=10.0, meta_batch=20) and cfg.reward_version == "v2"
    assert cfg.to_dict() == {k: v for k, v in OLD_CONFIG.items() if k != "reward_version"}
    from mamlkit.rl.train import rl_config_of

    # the stored scale 0 of the oldest runs meant the family's legacy scale: 1 for nav2d, 10 for cheetah
    assert rl_config_of(OLD_CONFIG | {"action_scale": 0.0}, "x").action_scale == 1.0
    assert rl_config_of(OLD_CONFIG | {"env": "cheetah-vel", "action_scale": 0.0}, "x").action_scale == 10.0
    # a setting the run's family does not read, away from its default, would change the run's meaning: refused
    with pytest.raises(config.ConfigError, match=r"reward_version='v1', which --algo maml-trpo and the nav2d "
                                                 "environment family do not read"):
        from_stored(OLD_CONFIG | {"reward_version": "v1"})


# ---------------------------------------------------------------- an environment family from outside the package

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEVELOPING.md"
MADE: list[dict] = []  # the options every environment of the line family was made with


@pytest.fixture
def line_family():
    """docs/DEVELOPING.md's line family, its file run as written (its registry line included), its `make` watched;
    forgotten after the test."""
    text = DOC.read_text()
    start = text.index("## How to add an RL environment family\n")
    blocks = re.findall(r"```python\n(.*?)```", text[start:text.index("\n## ", start + 1)], re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(DOC), "exec", dont_inherit=True), {"__name__": "line"})
    family = families.family_of("line")
    made = family.make

    def watched(*args, **options):
        MADE.append(options)
        return made(*args, **options)

    MADE.clear()
    yield families.register_env_family(dataclasses.replace(family, make=watched))
    families.unregister_env_family("line")


def test_a_family_registered_outside_the_package_builds_configs_with_its_defaults_and_options(line_family, capsys):
    cfg = RLConfig(env="line", line_speed=2.0)
    assert (cfg.episode_len, cfg.tasks_per_batch, cfg.test_traj, cfg.env_action_scale) == (7, 3, 4000 // 7, 10.0)
    assert cfg.to_dict()["line_speed"] == 2.0 and "reward_version" not in cfg.to_dict()
    assert from_stored(cfg.to_dict()) == cfg
    with pytest.raises(config.ConfigError, match="--line-speed applies to line environments only"):
        RLConfig(env="nav2d", line_speed=2.0)
    with pytest.raises(config.ConfigError, match="--reward-version has no effect on the line environment family"):
        RLConfig(env="line", reward_version="v1")
    # `rl train`'s config building: the request's flags and file values, then `rl train line --help`
    from mamlkit.loop import run

    built = run._rl_fresh_config(run.RLRequest(env="line", given={"line_speed": 0.5}, file_values={"horizon": 4}))
    assert (built.line_speed, built.episode_len, built.family) == (0.5, 4, line_family)
    from mamlkit.cli import main

    with pytest.raises(SystemExit):
        main(["rl", "train", "line", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "line: how far an action of 1 moves the point on the line [line: 1.0]" in text
    assert "200 cheetah) [line: 7]" in text and "[line: 3]" in text  # its horizon and meta-batch


def test_a_family_registered_outside_the_package_trains_and_reports(line_family, cli, tmp_path):
    code, _, err = cli("rl", "train", "line", "--out-dir", tmp_path, "--run-name", "r", *TINY)
    assert code == 0, err
    assert MADE  # its environments came from its make
    from mamlkit.rl import train

    trainer = train.load_trainer(tmp_path / "r")
    assert trainer.cfg.env == "line" and trainer.step == 1 and next(trainer.policy.parameters()).shape[-1] == 1
    assert json.loads((tmp_path / "r" / "config.json").read_text())["line_speed"] == 1.0
    assert "| 0 | " in (tmp_path / "r" / "eval.md").read_text()  # the standard report: returns after 0..K steps


def test_a_family_s_own_option_reaches_its_environments(line_family, cli, tmp_path):
    code, _, err = cli("rl", "train", "line", "--line-speed", "0.5", "--out-dir", tmp_path, *TINY)
    assert code == 0, err
    assert MADE and all(options == {"line_speed": 0.5} for options in MADE)
