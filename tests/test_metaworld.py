"""Meta-World families (the optional ``metaworld`` extra): splits, reward versions, the official evaluation
through the MetaLearningAgent wrapper, the records in checkpoints and reports, and bad input (exit 2).

The tests that build Meta-World's simulators need the ``metaworld`` package (``pip install
'mamlkit[metaworld]'``) and skip without it; the missing package's message and the agent's adaptation step
run everywhere."""

from __future__ import annotations

import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch

from mamlkit import checkpoint
from mamlkit.base.batch import task_generator
from mamlkit.base.errors import UserError
from mamlkit.cli import main
from mamlkit.rl.config import RLConfig

torch.set_num_threads(1)
TINY = dict(env="ml1-reach", hidden_sizes=(8,), meta_batch=2, traj_per_task=2, horizon=6, dtype="float64",
            eval_tasks=2, eval_traj=1, eval_lrs=(0.1,), val_tasks=2, val_every=1, progress=False)


def _goals(tasks) -> set[tuple[float, ...]]:
    return {tuple(np.round(pickle.loads(t.data)["rand_vec"], 12)) for t in tasks}


def test_without_the_package_the_message_names_the_extra(monkeypatch):
    from mamlkit.rl import envs

    monkeypatch.setitem(sys.modules, "metaworld", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'mamlkit\[metaworld\]'"):
        envs.check_env("ml1-reach")


def test_the_agents_adaptation_step_is_training_s_inner_step_on_the_episodes_it_was_shown():
    from collections import namedtuple

    from mamlkit.rl import metaworld_eval, sampling
    from mamlkit.rl.maml_trpo import adapt_tasks
    from mamlkit.rl.train import make_policy

    cfg = RLConfig(**TINY)
    policy = make_policy(cfg)
    E, N, H = 3, 2, 4  # goals, episodes, steps
    gen = torch.Generator().manual_seed(0)
    ep = sampling.Episodes(torch.randn(E, N, H, 39, generator=gen, dtype=torch.float64),
                           torch.randn(E, N, H, 4, generator=gen, dtype=torch.float64),
                           torch.randn(E, N, H, generator=gen, dtype=torch.float64),
                           torch.ones(E, N, H, dtype=torch.float64), torch.zeros(E, N, H, 8, dtype=torch.float64))
    Timestep = namedtuple("Timestep", "observation action reward terminated truncated aux_policy_outputs")
    agent = metaworld_eval.PolicyAgent(policy, cfg, (0.1, 0.05), gen)
    for n in range(N):  # the vector environment's steps, as the package hands them over
        for h in range(H):
            agent.step(Timestep(ep.obs[:, n, h].numpy(), None, ep.rewards[:, n, h].numpy(), np.zeros(E, bool),
                                np.full(E, h == H - 1), {"policy_action": ep.actions[:, n, h].numpy(),
                                                         "dist": ep.dist[:, n, h].numpy()}))
    agent.adapt()
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    expected = adapt_tasks(policy, theta, *sampling.pack(ep, cfg.gamma, cfg.gae_lambda, with_dist=False), 0.1, False)
    assert agent.per_task and all(torch.equal(agent.params[k], expected[k]) for k in expected)
    assert not torch.equal(expected["log_std"][0], theta["log_std"])  # the step moved the policy
    agent.init()  # a new round starts from the meta-learned parameters
    assert agent.params is agent.theta and not agent.per_task


def test_training_samples_the_train_split_only_and_refuses_a_test_task(tmp_path, monkeypatch):
    pytest.importorskip("metaworld")
    from mamlkit.rl import metaworld as mw
    from mamlkit.rl import train
    from mamlkit.rl.maml_trpo import MAMLTRPO

    bench = mw.benchmark("ml1-reach", 0)
    train_goals, test_goals = _goals(bench.train_tasks), _goals(bench.test_tasks)
    assert len(train_goals) == len(test_goals) == 50 and not train_goals & test_goals
    seen: list = []
    built = mw.MetaWorldTasks.__init__

    def recording(self, env, tasks, *args, **kwargs):
        built(self, env, tasks, *args, **kwargs)
        seen.extend(self.tasks)

    monkeypatch.setattr(mw.MetaWorldTasks, "__init__", recording)
    trainer = train.new_trainer(RLConfig(**TINY, iterations=2, out_dir=str(tmp_path)), tmp_path / "run")
    train.fit(trainer)  # two meta-iterations and two validations
    assert len(seen) == 2 * (2 * 2 * 2 + 2 * 2 * 2)  # per iteration: 2 tasks x 2 episodes, pre and post; validation
    assert _goals(seen) <= train_goals and not _goals(seen) & test_goals

    test_rows = mw.sample_tasks("ml1-reach", 3, task_generator(0, "test", 0), "test", 0)
    assert (test_rows[:, 0] == mw.TEST).all() and _goals(mw.resolve("ml1-reach", test_rows)) <= test_goals
    val_rows = mw.sample_tasks("ml1-reach", 3, task_generator(0, "val", 0), "val", 0)
    assert (val_rows[:, 0] == mw.TRAIN).all()
    with pytest.raises(mw.TestTaskInTraining, match="test split"):
        MAMLTRPO(trainer.policy, trainer.cfg).meta_step(test_rows, task_generator(0, "train", 9))


def test_a_resumed_run_repeats_the_uninterrupted_one_exactly(tmp_path):
    pytest.importorskip("metaworld")
    from mamlkit.rl import train

    cfg = RLConfig(**TINY | {"val_every": 0}, iterations=2, out_dir=str(tmp_path))
    whole = train.fit(train.new_trainer(cfg, tmp_path / "whole"))
    train.fit(train.new_trainer(cfg, tmp_path / "half"), stop_at=1)
    resumed = train.fit(train.load_trainer(tmp_path / "half"))  # on simulators the first runs have stepped
    assert resumed.step == whole.step == 2
    for (name, a), b in zip(whole.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b), name
    start = train.make_policy(cfg).parameters()
    assert any(not torch.equal(a, b) for a, b in zip(whole.policy.parameters(), start))  # training moved it


def test_reward_version_reaches_the_simulators_and_actions_are_scaled_as_the_package_steps(monkeypatch):
    pytest.importorskip("metaworld")
    from mamlkit.rl import metaworld as mw
    from mamlkit.rl.envs import make_env

    rows = mw.sample_tasks("ml1-push", 2, task_generator(0, "train", 0), "train", 0)
    action = torch.tensor([[3.0, -20.0, 5.0, 10.0]], dtype=torch.float64).expand(2, 1, 4)  # scale 10: clipped to ±1
    rewards = {}
    for version in ("v1", "v2"):
        env = make_env("ml1-push", rows, 1, 3, action_scale=10.0, reward_version=version)
        obs, _ = env.reset()
        for _ in range(2):
            obs, rewards[version], _, trunc, _ = env.step(action)
        assert not trunc.any()
        # the same task stepped by the package itself, with the action the policy's maps to
        task = mw.resolve("ml1-push", rows[1:])[0]
        sim = mw.benchmark("ml1-push", 0).train_classes["push-v3"](reward_function_version=version)
        sim.set_task(task)
        first = sim.reset()[0]
        for _ in range(2):
            o, r, *_ = sim.step(np.array([0.3, -1.0, 0.5, 1.0]))
        assert np.array_equal(o, obs[1, 0].numpy()) and r == rewards[version][1, 0].item()
        assert first.shape == (39,)
    assert not torch.allclose(rewards["v1"], rewards["v2"])  # the two reward functions differ


def test_copies_of_a_task_share_one_model_and_step_as_independent_simulators():
    pytest.importorskip("metaworld")
    from mamlkit.rl import metaworld as mw
    from mamlkit.rl.envs import make_env

    # button-press writes the button's position into the model when it resets: sharing across tasks would be wrong
    rows = mw.sample_tasks("ml1-button-press", 2, task_generator(0, "train", 1), "train", 0)
    env = make_env("ml1-button-press", rows, 3, 4, action_scale=1.0)
    sims = env.sims
    assert sims[0].model is sims[2].model and sims[3].model is sims[5].model and sims[0].model is not sims[3].model
    actions = torch.rand(4, 2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    obs, _ = env.reset()
    shared = [obs] + [env.step(a)[:2] for a in actions]
    cls = mw.benchmark("ml1-button-press", 0).train_classes["button-press-v3"]
    for t, task in enumerate(mw.resolve("ml1-button-press", rows)):
        for n in range(3):
            sim = cls(reward_function_version="v2")  # a simulator of its own, with its own model
            sim.set_task(task)
            assert np.array_equal(sim.reset()[0], shared[0][t, n].numpy())
            for k, a in enumerate(actions):
                o, r, *_ = sim.step(a[t, n].numpy())
                assert np.array_equal(o, shared[k + 1][0][t, n].numpy()) and r == shared[k + 1][1][t, n].item()


def test_the_policy_passes_metaworlds_own_evaluation_on_a_tiny_budget():
    pytest.importorskip("metaworld")
    from metaworld.evaluation import MetaLearningAgent

    from mamlkit.rl import metaworld_eval
    from mamlkit.rl.train import make_policy

    cfg = RLConfig(**TINY)
    policy = make_policy(cfg)
    agent = metaworld_eval.PolicyAgent(policy, cfg, (0.1,), task_generator(0, "test", 0))
    for name in ("init", "adapt_action", "step", "adapt", "eval_action", "reset"):  # the protocol's methods
        assert callable(getattr(agent, name)) and hasattr(MetaLearningAgent, name)
    result = metaworld_eval.official_evaluation(policy, cfg, (1,), eval_episodes=1)
    assert result["sub_envs"] == 2 and result["rounds"] == 1 and set(result["steps"]) == {"0", "1"}
    for r in result["steps"].values():
        assert r["goals"] == 2 and 0 <= r["success_rate"]["mean"] <= 1 and 0 <= r["official_success_rate"] <= 1
        # the package scores the first episode of its one task type: the first sub-environment's goal
        assert r["official_return"] == pytest.approx(r["goal_returns"][0], rel=1e-12)
        assert r["return"]["mean"] == pytest.approx(sum(r["goal_returns"]) / 2, rel=1e-12)
        assert len(r["goal_returns"]) == len(r["goal_successes"]) == len(r["test_goals"]) == 2
        assert r["success_rate"]["mean"] == pytest.approx(sum(r["goal_successes"]) / 2, rel=1e-12)
        assert math.isfinite(r["return"]["ci95"])
    # every step count ran on the same two goals of the test split (indices_in_test_split raises on any other)
    assert result["steps"]["0"]["test_goals"] == result["steps"]["1"]["test_goals"]
    assert len(set(result["steps"]["0"]["test_goals"])) == 2
    bench = metaworld_eval.benchmark("ml1-reach", 0)
    key = [metaworld_eval.goal_key(pickle.loads(t.data)["rand_vec"])
           for t in (bench.test_tasks[7], bench.train_tasks[7])]
    assert metaworld_eval.indices_in_test_split("ml1-reach", 0, [key[:1]]) == [7]
    with pytest.raises(RuntimeError, match="outside the benchmark's test split"):
        metaworld_eval.indices_in_test_split("ml1-reach", 0, [key])
    # one adaptation step moved the policy: the returns after it are not the pre-update ones
    assert result["steps"]["1"]["goal_returns"] != result["steps"]["0"]["goal_returns"]


def test_each_step_counts_simulators_are_freed_before_the_next_are_built(monkeypatch):
    """An evaluation builds a test vector environment per step count, each simulator with its own compiled
    model (50 goals: about 1.1 GB); they hold reference cycles, so with the collector idle they outlived their
    step count and a 50-goal evaluation peaked at 4 GB."""
    import gc
    import weakref

    mw = pytest.importorskip("metaworld")
    from mamlkit.rl import metaworld_eval
    from mamlkit.rl.train import make_policy

    real, built = mw.make_ml_envs_test, []

    def watched(*args, **kwargs):
        assert all(ref() is None for ref in built), "the previous step count's simulators are still alive"
        envs = real(*args, **kwargs)
        built.extend(weakref.ref(e.unwrapped) for e in envs.envs)
        return envs

    monkeypatch.setattr(mw, "make_ml_envs_test", watched)
    cfg = RLConfig(**TINY)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # the collector's own timing must not decide the outcome
    try:
        metaworld_eval.official_evaluation(make_policy(cfg), cfg, (1,), eval_episodes=1)
    finally:
        if was_enabled:
            gc.enable()
    assert len(built) == 2 * 2 and all(ref() is None for ref in built)


def test_every_goal_is_scored_even_when_the_package_stops_at_the_first_episodes_to_end():
    mw = pytest.importorskip("metaworld")
    from metaworld.evaluation import metalearning_evaluation

    from mamlkit.rl import metaworld_eval

    class Scripted:  # moves sub-environment 0's hand straight to its goal; sub-environment 1's stays still
        def __init__(self, envs):
            self.envs = envs

        def eval_action(self, obs):
            action = np.zeros((len(obs), 4))
            action[0, :3] = np.clip(100 * (self.envs.get_attr("_target_pos")[0] - obs[0, :3]), -1, 1)
            return action

        def init(self):
            pass

        def reset(self, env_mask):
            pass

    envs = mw.make_ml_envs_test("reach-v3", seed=0, meta_batch_size=2, max_episode_steps=100)
    agent = Scripted(envs)
    recorder = metaworld_eval.Recorder(envs, agent, 2)
    success, _, _ = metalearning_evaluation(agent, recorder, num_evals=1, adaptation_steps=0, evaluation_episodes=2)
    envs.close()
    first, second = recorder.episodes[(0, 0)], recorder.episodes[(0, 1)]
    # the package stopped after sub-environment 0's two quick successes: it scored only that goal
    assert success == 1.0 and [s for s, _ in first[:2]] == [1.0, 1.0]
    # the recorder then ran sub-environment 1's goal to its two (failed, full-length) episodes
    assert len(second) == 2 and [s for s, _ in second] == [0.0, 0.0]


@pytest.mark.parametrize("env", ["ml1-reach", "ml10"])
def test_the_report_shows_the_published_maml_figures_with_source_and_reward_version(env, tmp_path, monkeypatch):
    pytest.importorskip("metaworld")
    from mamlkit.rl import metaworld_eval, metaworld_published

    step = {"success_rate": {"mean": 0.5, "ci95": 0.1}, "return": {"mean": 100.0, "ci95": 5.0},
            "official_success_rate": 0.5, "official_return": 100.0}
    fake = {"sub_envs": 5, "rounds": 1, "adaptation_episodes": 1, "evaluation_episodes": 1,
            "steps": {"0": step, "1": step}}
    monkeypatch.setattr(metaworld_eval, "official_evaluation", lambda *a, **k: fake)  # the table, not the run
    cfg = RLConfig(**{**TINY, "env": env})
    text = metaworld_eval.report(tmp_path, None, cfg, (1,))
    assert text == (tmp_path / "eval.md").read_text()
    published = text.split(f"Published MAML figures for {env}")[1]
    assert "| source | where | reward | split | success rate | measure |" in published
    rows = metaworld_published.figures(env)
    assert {"meta-train", "meta-test"} <= {split for f in rows for split in f.split.split(" and ")}
    for f in rows:  # every figure with its source, place, reward version and split
        value = "plotted only" if f.value is None else f"{100 * f.value:.1f}%"
        assert f"| {f.source} | {f.where} | {f.reward} | {f.split} | {value} |" in published
    if env == "ml10":  # the 2019 paper's v1 numbers and the 2021 revision's (v2) Table 1
        assert "| v1 | meta-test | 36.0% |" in published and "| Table 1 | v2 | meta-test | 31.6% |" in published
        assert "| meta-test | 13.2% |" in published
    else:
        assert "| Figure 4 | v2 | meta-train and meta-test | plotted only |" in published
    saved = json.loads((tmp_path / "eval.json").read_text())["published"]
    assert [(f["source"], f["split"], f["value"]) for f in saved] == [(f.source, f.split, f.value) for f in rows]
    assert metaworld_published.table("ml1-door-open", "v2") == []  # none found: nothing printed


def test_cli_train_eval_and_the_records_of_versions(tmp_path, capsys):
    pytest.importorskip("metaworld")
    argv = ["rl", "train", "ml1-reach", "--iterations", "1", "--meta-batch", "2", "--traj-per-task", "2",
            "--horizon", "5", "--hidden-sizes", "8", "--eval-tasks", "2", "--eval-traj", "1", "--eval-lrs", "0.1",
            "--val-every", "0", "--reward-version", "v1", "--no-progress", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    run = tmp_path / "rl-ml1-reach-maml-trpo"
    _, state = checkpoint.load(run / "checkpoint.safetensors")
    expected = {"package": "metaworld", "version": "3.1.1", "reward_version": "v1", "benchmark": "ML1",
                "task": "reach-v3"}
    assert state["environment"] == expected and state["config"]["reward_version"] == "v1"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row[k] <= 1 for row in logged if row["split"] == "train" for k in ("success_pre", "success_post"))
    assert json.loads((run / "eval.json").read_text())["environment"] == expected
    assert "Meta-World 3.1.1 (ML1 reach-v3, reward v1)" in (run / "eval.md").read_text()
    capsys.readouterr()
    assert main(["rl", "eval", str(run), "--steps", "1", "--eval-episodes", "1", "--overwrite"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert list(ev["steps"]) == ["0", "1"] and ev["evaluation_episodes"] == 1
    assert ev["seed"] == 0  # the benchmark's seed fixes the test goals that test_goals index
    assert "| 1 |" in capsys.readouterr().out
    assert main(["rl", "eval", str(run), "--eval-episodes", "0", "--overwrite"]) == 2
    assert "--eval-episodes must be >= 1" in capsys.readouterr().err
    assert main(["rl", "eval", str(run), "--eval-tasks", "51", "--overwrite"]) == 2  # ML1 has 50 test goals
    assert "more test goals than ml1-reach's test split holds (50" in capsys.readouterr().err
    # a Meta-World policy is not adapted to a 2D goal
    assert main(["rl", "adapt", str(run), "--goal", "0.1", "0.1", "--out", str(tmp_path / "a.png")]) == 2
    assert "give three numbers" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["rl", "train", "ml1-reachh"], "did you mean ml1-reach"),
    (["rl", "train", "ml1-nothing-like-it"], "ML1 families are ml1-<task>"),
    (["rl", "train", "ml45"], "name an environment"),
    (["rl", "train", "ml1-reach", "--reward-version", "v3"], "reward_version must be one of v2, v1"),
    (["rl", "train", "nav2d", "--reward-version", "v1"], "applies to Meta-World environments only"),
    (["rl", "train", "ml1-reach", "--horizon", "501"], "horizon must be <= 500"),
])
def test_bad_names_versions_and_horizons_exit_2(argv, message, capsys, tmp_path):
    pytest.importorskip("metaworld")
    assert main(argv + (["--out-dir", str(tmp_path)] if argv[1] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def _tiny_run(tmp_path):
    from mamlkit.rl import train

    cfg = RLConfig(**TINY | {"val_every": 0}, iterations=1, out_dir=str(tmp_path))
    return train.fit(train.new_trainer(cfg, tmp_path / "run")), tmp_path / "run"


def test_adapt_writes_the_figure_for_a_goal_and_for_a_test_task(tmp_path, capsys):
    pytest.importorskip("metaworld")
    _, run = _tiny_run(tmp_path)
    capsys.readouterr()
    fig = tmp_path / "goal.png"
    assert main(["rl", "adapt", str(run), "--goal", "0.05", "0.85", "0.2", "--steps", "2", "--traj", "2",
                 "--out", str(fig)]) == 0
    out = capsys.readouterr().out
    assert fig.stat().st_size > 10_000 and "goal at (0.050, 0.850, 0.200)" in out
    assert all(f"  {k} step{'s' * (k != 1)}: " in out for k in range(3)) and "  3 steps" not in out
    fig = tmp_path / "task.svg"
    assert main(["rl", "adapt", str(run), "--test-task", "7", "--steps", "1", "--traj", "1", "--out", str(fig)]) == 0
    assert fig.read_text().startswith("<?xml") and "test task 7" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--goal", "0.5", "0.85", "0.2"], "outside reach-v3's goal space: give three numbers with x in [-0.1, 0.1]"),
    (["--goal", "0", "0.85", "nan"], "outside reach-v3's goal space"),
    (["--goal", "0", "0.85"], "give three numbers with x in [-0.1, 0.1], y in [0.8, 0.9], z in [0.05, 0.3]"),
    (["--test-task", "50"], "--test-task 50 is outside ml1-reach's test split: use an index from 0 to 49"),
    (["--test-task", "-1"], "use an index from 0 to 49"),
    (["--goal", "0", "0.85", "0.2", "--task-type", "push"], "--task-type 'push' is not a test task type of "
                                                            "ml1-reach: use one of reach"),
    (["--goal", "-0.05", "0.82", "0.2"], "reach-v3 rejects this goal: it is too close to the objects' positions"),
    (["--goal", "0", "0.85", "0.2", "--test-task", "1"], "pass either --goal X Y Z or --test-task INDEX"),
    ([], "pass either --goal X Y Z or --test-task INDEX"),
])
def test_adapt_bad_goals_indices_and_task_types_exit_2(argv, message, tmp_path, capsys):
    pytest.importorskip("metaworld")
    _, run = _tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["rl", "adapt", str(run), "--traj", "1", "--out", str(tmp_path / "f.png")] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "f.png").exists()


def test_adapt_with_four_numbers_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["rl", "adapt", "run", "--goal", "0", "0.85", "0.2", "1"])
    assert e.value.code == 2 and "expected 2 arguments (X Y, nav2d) or 3" in capsys.readouterr().err


def test_adapting_to_a_goal_takes_training_s_inner_step_on_the_same_episodes():
    pytest.importorskip("metaworld")
    from mamlkit.rl import metaworld as mw
    from mamlkit.rl import metaworld_adapt
    from mamlkit.rl.maml_trpo import MAMLTRPO, adapt_tasks
    from mamlkit.rl.train import make_policy

    cfg = RLConfig(**TINY | {"eval_traj": 2, "eval_lrs": (0.1, 0.05)})
    assert cfg.inner_lr == cfg.eval_lrs[0] and cfg.traj_per_task == cfg.test_traj
    policy = make_policy(cfg)
    row = mw.given_goal("ml1-reach", 0, [0.1, 0.9, 0.1])
    assert metaworld_adapt.task_goal("ml1-reach", row).tolist() == [0.1, 0.9, 0.1]
    sim = mw.MetaWorldTasks("ml1-reach", row, 1, 3).sims[0]
    sim.set_task(mw.resolve("ml1-reach", row)[0])
    sim.reset()
    assert np.array_equal(sim._target_pos, [0.1, 0.9, 0.1])  # the simulator's goal is the one given
    result = metaworld_adapt.adapt(policy, cfg, row, torch.Generator().manual_seed(5))
    batch, _ = MAMLTRPO(policy, cfg).collect(row, torch.Generator().manual_seed(5))  # training's sampling
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    expected = adapt_tasks(policy, theta, batch.support_x, batch.support_y, cfg.inner_lr, per_task=False)
    assert len(result["path"]) == 3 and all(torch.equal(result["path"][1][k], expected[k]) for k in expected)
    assert not torch.equal(expected["log_std"][0], theta["log_std"])  # the step moved the policy
    hands = [ep["hand"] for ep in result["episodes"]]
    assert all(h.shape == (cfg.episode_len + 1, 3) for h in hands) and np.array_equal(hands[0][0], hands[2][0])
    assert not np.array_equal(hands[0], hands[2])  # the adapted policy moves the hand differently


def _offscreen_gl():
    """Skip unless MuJoCo can render offscreen here (EGL or OSMesa: a system library, not a Python package)."""
    from mamlkit.rl import render

    try:
        context, _ = render.gl_context(32, 32)
    except UserError as e:
        pytest.skip(str(e))
    context.free()


def test_rendering_leaves_the_episode_unchanged_and_shows_its_states():
    """A rendered episode is the unrendered one (hand, return, success, bit for bit); its frames are the
    scene at steps 0, 5, 10, ... and the last, and they show the arm moving (frames differ), the same state
    rendering to the same pixels."""
    pytest.importorskip("metaworld")
    _offscreen_gl()
    from mamlkit.rl import metaworld as mw
    from mamlkit.rl import metaworld_adapt, render
    from mamlkit.rl.train import make_policy

    cfg = RLConfig(**TINY | {"horizon": 12})
    policy = make_policy(cfg)
    row = mw.test_task_row("ml1-reach", 0, 3)
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    plain = metaworld_adapt.mean_action_episode(policy, cfg, row, theta, False)
    with render.OffscreenRenderer(64, 48, camera=metaworld_adapt.CAMERA, flip=False) as r:
        shot = metaworld_adapt.mean_action_episode(policy, cfg, row, theta, False, r)
        env = mw.MetaWorldTasks("ml1-reach", row, 1, 12)
        env.reset()
        sim = env.sims[0]
        again = r.frame(sim.model, sim.data)
        assert np.array_equal(again, r.frame(sim.model, sim.data))
        assert np.array_equal(again, shot["frames"][0])   # the episode's first frame is its reset state
    assert np.array_equal(plain["hand"], shot["hand"]) and plain["return"] == shot["return"]
    assert plain["success"] == shot["success"] and "frames" not in plain
    assert len(shot["frames"]) == len(shot["frame_steps"]) == 4   # t = 0, 5, 10 and the last, 12
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in shot["frames"])
    assert not np.array_equal(shot["frames"][0], shot["frames"][-1])  # the arm moved


def test_adapt_renders_the_episodes_side_by_side(tmp_path, capsys):
    pytest.importorskip("metaworld")
    _offscreen_gl()
    from PIL import Image

    _, run = _tiny_run(tmp_path)
    capsys.readouterr()
    video, fig = tmp_path / "reach.gif", tmp_path / "reach.png"
    assert main(["rl", "adapt", str(run), "--test-task", "3", "--steps", "2", "--traj", "1", "--out", str(fig),
                 "--video", str(video)]) == 0
    out = capsys.readouterr().out
    assert "video: " in out and "(3 frames of 3 episodes side by side" in out and fig.exists()
    with Image.open(video) as gif:   # horizon 6: frames at t = 0, 5 and 6; three panels of 320 x (240 + label)
        assert (gif.n_frames, gif.size) == (3, (3 * 320, 240 + 16))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("video, message", [
    ("clip.mp4", "--video {d}/clip.mp4 must end in .gif"),
    ("nowhere/clip.gif", "--video {d}/nowhere/clip.gif: folder {d}/nowhere does not exist"),
    ("f.png", "--video {d}/f.png must end in .gif (an animated GIF)"),
])
def test_adapt_bad_videos_exit_2_before_anything_runs(video, message, tmp_path, capsys):
    assert main(["rl", "adapt", str(tmp_path / "no-run"), "--goal", "0", "0.85", "0.2", "--out",
                 str(tmp_path / "f.png"), "--video", str(tmp_path / video)]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err and "Traceback" not in err


def test_without_offscreen_opengl_the_message_names_the_libraries(monkeypatch):
    from mamlkit.rl import render

    monkeypatch.setattr(render, "BACKENDS", ("no-such-backend",))
    with pytest.raises(UserError, match=r"no offscreen OpenGL on this machine \(no-such-backend: "
                                        r"ModuleNotFoundError.*apt-get install libegl1"):
        render.gl_context(32, 32)


def test_a_nav2d_policy_has_no_video(tmp_path, capsys):
    assert main(["rl", "adapt", "nav2d", "--goal", "0.2", "0.3", "--traj", "1", "--out", str(tmp_path / "n.png"),
                 "--video", str(tmp_path / "n.gif")]) == 2
    assert "--video renders a MuJoCo scene" in capsys.readouterr().err
    assert not (tmp_path / "n.png").exists() and not (tmp_path / "n.gif").exists()


def _report(goals: list[int], successes: list[float]) -> dict:
    step = {"test_goals": goals, "goal_successes": successes,
            "success_rate": {"mean": sum(successes) / len(successes), "ci95": 0.0}}
    return {"env": "ml1-reach", "environment": {"version": "3.1.1", "reward_version": "v2"}, "steps": {"1": step}}


def test_two_evaluations_pair_goal_by_goal():
    """benchmarks/paired_eval.py: the paired interval is the interval of the per-goal differences, matched by
    test-split index (not by position), and the sign test is the exact binomial one."""
    import importlib.util
    from pathlib import Path

    from mamlkit.base.metrics import mean_ci

    path = Path(__file__).parents[1] / "benchmarks" / "paired_eval.py"
    spec = importlib.util.spec_from_file_location("paired_eval", path)
    paired_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired_eval)

    a = _report([3, 1, 2, 0, 4, 5, 6], [1, 1, 1, 1, 1, 2 / 3, 0])
    b = _report([0, 1, 2, 3, 4, 5, 6], [0, 1 / 3, 1, 0, 1, 1, 0])   # goal 3 is a's first, b's fourth
    (row,) = paired_eval.paired(a, b)
    diff = torch.tensor([1 - 0, 1 - 1 / 3, 1 - 1, 1 - 0, 1 - 1, 2 / 3 - 1, 0 - 0], dtype=torch.float64)
    mean, ci = mean_ci(diff)
    assert row["difference"] == pytest.approx(mean, rel=1e-12) and row["ci95"] == pytest.approx(ci, rel=1e-12)
    assert (row["a_better"], row["b_better"]) == (3, 1)
    assert row["sign_test_p"] == pytest.approx(2 * (1 + 4) / 2 ** 4, rel=1e-12)   # 3 of 4, two-sided: 0.625
    assert paired_eval.sign_test(9, 0) == pytest.approx(2 / 2 ** 9, rel=1e-12)
    assert paired_eval.sign_test(0, 0) == 1.0
    with pytest.raises(SystemExit, match="different test goals"):
        paired_eval.paired(a, _report([0, 1, 2, 3, 4, 5, 7], [0] * 7))
    with pytest.raises(SystemExit, match="same benchmark"):
        paired_eval.paired(a, {**b, "env": "ml10"})
    with pytest.raises(SystemExit, match="benchmark seeds 0 and 1"):
        paired_eval.paired({**a, "seed": 0}, {**b, "seed": 1})
    # pooled over two seeds: the (seed, goal) differences together, each seed matched within itself
    c, d = _report([5, 9], [1, 1]), _report([9, 5], [1, 0])   # goal 5: 1 - 0; goal 9: 1 - 1
    (pool,) = paired_eval.pooled([(a, b), (c, d)])
    mean, ci = mean_ci(torch.cat([diff, torch.tensor([1.0, 0.0], dtype=torch.float64)]))
    assert pool["goals"] == 9 and pool["difference"] == pytest.approx(mean, rel=1e-12)
    assert pool["ci95"] == pytest.approx(ci, rel=1e-12) and (pool["a_better"], pool["b_better"]) == (4, 1)
    assert pool["a"] == pytest.approx((7 * a["steps"]["1"]["success_rate"]["mean"] + 2 * 1.0) / 9, rel=1e-12)
    assert pool["sign_test_p"] == pytest.approx(2 * (1 + 5) / 2 ** 5, rel=1e-12)
