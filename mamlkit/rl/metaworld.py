"""Meta-World's ML1 and ML10 (Farama Foundation, ``metaworld`` 3.1.1) as meta-RL environments (its official
evaluation, with mamlkit's policy as its ``MetaLearningAgent``, is :mod:`mamlkit.rl.metaworld_eval`).

Needs the optional extra: ``pip install 'mamlkit[metaworld]'`` (``metaworld==3.1.1`` pins ``mujoco==3.3.0``,
inside the ``rl`` extra's range). Families: ``ml1-<task>`` (any ML1 task of the package, e.g. ``ml1-reach``,
``ml1-push``, ``ml1-pick-place``: one task type, 50 train and 50 test goals) and ``ml10`` (10 train task
types, 5 test ones, 50 goals each). The benchmark is built with the run's seed (its goals depend on it).

A task row ``[split, index, seed]`` names task ``index`` of the benchmark of ``seed``'s train (0) or test
(1) split, so a row alone rebuilds its simulator. Training and validation draw train rows only, evaluation
test rows, and :func:`check_train_tasks` (called by every meta-step) refuses a test row in training: Meta-World
PR #573 found that its own ``ML1-train`` had silently used the test split.

Rewards are the package's ``v2`` functions unless ``--reward-version v1``; results differ a lot between them,
so checkpoints and reports record the reward version beside the package's version (:func:`record`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import pickle
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.errors import UserError
from mamlkit.rl.cheetah import _mujoco_warnings_to_log

PACKAGE_VERSION = "3.1.1"  # the version the extra pins and the tests ran on
log = logging.getLogger("mamlkit")
TRAIN, TEST, GIVEN = 0, 1, 2  # the split codes of a task row; GIVEN: a goal of the user's (:func:`given_goal`)
GOALS_PER_TYPE = 50  # Meta-World's goals per task type and split (metaworld._N_GOALS)
# The tasks of the user's goals (`rl adapt --goal`): a row [GIVEN, i, seed] names _GIVEN[i]. A goal is no task of
# the benchmark, so it has no index there; a row still has to name it for the simulators' constructor.
_GIVEN: list[Any] = []
# Simulators, reused across batches (building one parses the XML): groups of N copies of one task class that share
# one compiled model, by (task class, reward version, N).
_POOL: dict[tuple[str, str, int], list[list[Any]]] = {}


class TestTaskInTraining(RuntimeError):
    """A task of the benchmark's test split reached the training sampler."""


def _package():
    try:
        import metaworld  # the package, not this module: imports are absolute
    except ImportError:
        raise UserError("the Meta-World environments need the metaworld package: pip install 'mamlkit[metaworld]'"
                        ) from None
    except OSError as e:  # measured: pip's downgrade from mujoco 4 leaves mujoco-core's plugins behind
        raise UserError(f"Meta-World's simulator (mujoco) does not load: {e}. If mujoco 4 was installed before, its "
                        "split packages are left over: pip uninstall mujoco-core mujoco-studio mujoco-studio-wasm, "
                        "then pip install --force-reinstall --no-deps mujoco==3.3.0") from None
    return metaworld


def installed_version() -> str:
    """The installed ``metaworld`` package's version."""
    _package()
    return metadata.version("metaworld")


def task_types() -> list[str]:
    """The ML1 task types of the installed package, as mamlkit names them (``reach``, ``pick-place``, ...)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    _package()
    return sorted(name.removesuffix("-v3") for name in ALL_V3_ENVIRONMENTS)


def check_env(env: str) -> None:
    """Refuse a Meta-World family the installed package does not have, naming the close ones; warn if the
    installed package is not the version the extra pins (its tasks and rewards may differ)."""
    if (version := installed_version()) != PACKAGE_VERSION:
        log.warning("metaworld %s is installed; mamlkit's Meta-World families are tested with %s, and runs "
                    "record the version they used", version, PACKAGE_VERSION)
    if env == "ml10":
        return
    kind = env.removeprefix("ml1-")
    names = task_types()
    if not env.startswith("ml1-") or kind not in names:
        close = difflib.get_close_matches(kind, names, n=3)
        hint = f"did you mean {', '.join('ml1-' + c for c in close)}? " if close else ""
        raise UserError(f"unknown Meta-World environment {env!r}: {hint}ML1 families are ml1-<task> with <task> one "
                        f"of {', '.join(names)}; or ml10")


@functools.lru_cache(maxsize=4)
def benchmark(env: str, seed: int) -> Any:
    """The Meta-World benchmark of family ``env`` built with ``seed`` (cached: building ML1 takes seconds)."""
    check_env(env)
    mw = _package()
    return mw.ML10(seed=seed) if env == "ml10" else mw.ML1(f"{env.removeprefix('ml1-')}-v3", seed=seed)


def sample_tasks(env: str, num_tasks: int, generator: torch.Generator, split: str, seed: int) -> Tensor:
    """Task rows ``[T, 3]`` (split, index, seed), float64: distinct tasks where the split has enough,
    uniform from the test split for ``split == "test"`` and from the train split for every other split."""
    code = TEST if split == "test" else TRAIN
    bench = benchmark(env, seed)
    n = len(bench.test_tasks if code == TEST else bench.train_tasks)
    index = (torch.randperm(n, generator=generator)[:num_tasks] if num_tasks <= n
             else torch.randint(0, n, (num_tasks,), generator=generator))
    rows = torch.stack([torch.full((num_tasks,), code), index, torch.full((num_tasks,), seed)], dim=1)
    return rows.double()


def check_train_tasks(tasks: Tensor) -> None:
    """Raise :class:`TestTaskInTraining` if any row of ``tasks [T, 3]`` is from the test split."""
    test = (tasks[:, 0] != TRAIN).nonzero().flatten().tolist()
    if test:
        raise TestTaskInTraining(f"task rows {test[:10]} of this meta-batch are from the benchmark's test split; "
                                 "training samples the train split only")


def resolve(env: str, tasks: Tensor) -> list[Any]:
    """The ``metaworld.Task`` of every row of ``tasks [T, 3]``."""
    out = []
    for code, index, seed in tasks.tolist():
        if int(code) == GIVEN:
            out.append(_GIVEN[int(index)])
            continue
        bench = benchmark(env, int(seed))
        out.append((bench.test_tasks if int(code) == TEST else bench.train_tasks)[int(index)])
    return out


def test_types(env: str, seed: int) -> list[str]:
    """The task types of ``env``'s test split, as mamlkit names them (``reach``; ML10's five)."""
    return sorted(name.removesuffix("-v3") for name in benchmark(env, seed).test_classes)


def _of_type(env: str, seed: int, task_type: str | None) -> str:
    """The package's name of the test task type ``task_type`` (required for ML10, implied by an ML1 family)."""
    types = test_types(env, seed)
    if task_type is None and len(types) == 1:
        return f"{types[0]}-v3"
    if task_type is None:
        raise UserError(f"{env} has several test task types: name one with --task-type ({', '.join(types)})")
    if task_type.removesuffix("-v3") not in types:
        raise UserError(f"--task-type {task_type!r} is not a test task type of {env}: use one of {', '.join(types)}")
    return f"{task_type.removesuffix('-v3')}-v3"


def test_task_row(env: str, seed: int, index: int) -> Tensor:
    """The task row ``[1, 3]`` of test task ``index`` of the benchmark of ``seed``; refuses an index outside it."""
    n = len(benchmark(env, seed).test_tasks)
    if not 0 <= index < n:
        raise UserError(f"--test-task {index} is outside {env}'s test split: use an index from 0 to {n - 1}")
    return torch.tensor([[TEST, index, seed]], dtype=torch.float64)


def goal_bounds(env: str, seed: int, task_type: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The goal space (low, high) of a test task type of ``env``: the bounds its goals are drawn from."""
    name = _of_type(env, seed, task_type)
    with _mujoco_warnings_to_log():
        space = benchmark(env, seed).test_classes[name]().goal_space
    return np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)


class _Redrawn(Exception):
    """A simulator asked for its task's numbers again while resetting."""


def _reset_once(sim: Any, name: str) -> None:
    """Reset ``sim``, refusing a task it rejects: several task types redraw the goal while it is too close to the
    objects, which with a task's fixed numbers would loop for ever (reach: 0.15 apart in x-y)."""
    calls = []

    def numbers() -> np.ndarray:
        calls.append(1)
        if len(calls) > 10:  # a reset reads them a few times; a redraw loop reads them without end
            raise _Redrawn
        return sim._last_rand_vec

    sim._get_state_rand_vec = numbers
    try:
        sim.reset()
    except _Redrawn:
        raise UserError(f"{name} rejects this goal: it is too close to the objects' positions (the task type redraws "
                        "such goals); choose a goal farther from them, or --test-task INDEX") from None
    finally:
        del sim._get_state_rand_vec


def given_goal(env: str, seed: int, goal: list[float], task_type: str | None = None) -> Tensor:
    """The task row ``[1, 3]`` of ``goal`` (x, y, z) for a test task type of ``env``: its first test task (the
    objects' positions) with the goal replaced. Refuses a goal outside the type's goal space, or a type whose
    simulator does not take its goal from the task's last three numbers."""
    name = _of_type(env, seed, task_type)
    low, high = goal_bounds(env, seed, task_type)
    g = np.asarray(goal, dtype=np.float64)
    bounds = f"x in [{low[0]:g}, {high[0]:g}], y in [{low[1]:g}, {high[1]:g}], z in [{low[2]:g}, {high[2]:g}]"
    if g.shape != low.shape or not np.isfinite(g).all() or (g < low).any() or (g > high).any():
        raise UserError(f"--goal {' '.join(f'{v:g}' for v in goal)} is outside {name}'s goal space: give three "
                        f"numbers with {bounds}")
    bench = benchmark(env, seed)
    base = next(t for t in bench.test_tasks if t.env_name == name)
    data = pickle.loads(base.data)
    data["rand_vec"] = np.concatenate([np.asarray(data["rand_vec"], dtype=np.float64)[:-3], g])
    task = type(base)(env_name=name, data=pickle.dumps(data))
    with _mujoco_warnings_to_log():
        sim = bench.test_classes[name]()
        sim.set_task(task)
        _reset_once(sim, name)
    if not np.allclose(np.asarray(sim._target_pos, dtype=np.float64), g):  # its goal derives from its objects
        raise UserError(f"{name} places its goal from its objects' positions, not from a goal of yours: "
                        "use --test-task INDEX instead of --goal")
    _GIVEN.append(task)
    return torch.tensor([[GIVEN, len(_GIVEN) - 1, seed]], dtype=torch.float64)


def record(env: str, reward_version: str) -> dict[str, Any]:
    """The benchmark's identity for checkpoints and reports: package, its version, the reward version."""
    return {"package": "metaworld", "version": installed_version(), "reward_version": reward_version,
            "benchmark": "ML10" if env == "ml10" else "ML1",
            "task": None if env == "ml10" else f"{env.removeprefix('ml1-')}-v3"}


@functools.cache
def _model_sharing(cls: type) -> type:
    """``cls``, whose instances built while ``shared_model`` is set use that compiled model instead of their own.

    A Sawyer model is 21 MB (its meshes), against 0.2 MB of simulation data: the N copies of one task share
    one, so the default batch (20 tasks x 20 episodes) holds 20 models, not 400. Sharing within a task only is
    exact: several task types write object positions into the model when they reset, the same values for the
    same task, and stepping only reads it (the copies' own data carry their states)."""
    import mujoco

    class Sharing(cls):
        shared_model = None

        def _initialize_simulation(self):
            model = Sharing.shared_model
            return super()._initialize_simulation() if model is None else (model, mujoco.MjData(model))

    Sharing.__name__ = Sharing.__qualname__ = cls.__name__  # the package names tasks by class name
    return Sharing


def _group(cls: type, reward_version: str, n: int) -> list[Any]:
    """``n`` simulators of ``cls`` sharing one compiled model."""
    sharing = _model_sharing(cls)
    with _mujoco_warnings_to_log():
        first = sharing(reward_function_version=reward_version)
        sharing.shared_model = first.model
        try:
            return [first] + [sharing(reward_function_version=reward_version) for _ in range(n - 1)]
        finally:
            sharing.shared_model = None


def _simulators(classes: list[type], reward_version: str, n: int) -> list[Any]:
    """``n`` simulators sharing a model per entry of ``classes`` (one task each), reused from the pool."""
    taken: dict[tuple[str, str, int], int] = {}
    out = []
    for cls in classes:
        key = (cls.__name__, reward_version, n)
        pool = _POOL.setdefault(key, [])
        i = taken[key] = taken.get(key, -1) + 1
        if i == len(pool):
            pool.append(_group(cls, reward_version, n))
        out.extend(pool[i])
    return out


class MetaWorldTasks:
    """``[T, N]`` Meta-World simulators for the task rows ``tasks [T, 3]``, behind the API of
    :class:`~mamlkit.rl.envs.Nav2D`; ``info["success"] [T, N]`` is the package's success flag of the step.

    A task fixes the object and goal positions, so ``reset`` starts every episode of a task the same way
    (its ``seed`` is accepted for API parity). Episodes are ``horizon`` steps (<= 500, the package's limit)."""

    obs_dim = 39
    act_dim = 4

    def __init__(self, env: str, tasks: Tensor, num_envs: int, horizon: int = 500, action_scale: float = 1.0,
                 reward_version: str = "v2"):
        bench = benchmark(env, int(tasks[0, 2].item()) if tasks.numel() else 0)
        classes = {**bench.train_classes, **bench.test_classes}
        per_task = resolve(env, tasks)
        self.tasks = [t for t in per_task for _ in range(num_envs)]  # copy n of task t at t·N + n
        self.sims = _simulators([classes[t.env_name] for t in per_task], reward_version, num_envs)
        self.T, self.num_envs, self.horizon, self.action_scale = tasks.shape[0], num_envs, horizon, action_scale
        self.t = 0

    def reset(self, *, seed: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Set every copy's task and reset it: ``obs [T, N, 39]``."""
        obs = []
        for sim, task in zip(self.sims, self.tasks):
            sim.set_task(task)
            obs.append(sim.reset()[0])
        self.t = 0
        return torch.from_numpy(np.stack(obs)).view(self.T, self.num_envs, -1), {}

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """``action [T, N, 4]`` (the policy's: divided by ``action_scale``, clipped to ±1) -> ``obs [T, N, 39]``,
        ``reward [T, N]`` (the package's, of the run's reward version), never terminated, truncated at the
        horizon, and ``info`` with ``"active"`` and ``"success"``."""
        a = (action.detach().double() / self.action_scale).clamp(-1, 1).reshape(len(self.sims), -1).numpy()
        obs, reward, success = [], [], []
        for sim, ai in zip(self.sims, a):
            o, r, _, _, info = sim.step(ai)
            obs.append(o)
            reward.append(float(r))
            success.append(float(info["success"]))
        self.t += 1
        shape = (self.T, self.num_envs)
        return (torch.from_numpy(np.stack(obs)).view(*shape, -1), torch.tensor(reward, dtype=torch.float64).view(shape),
                torch.zeros(shape, dtype=torch.bool), torch.full(shape, self.t >= self.horizon),
                {"active": torch.ones(shape, dtype=torch.bool),
                 "success": torch.tensor(success, dtype=torch.float64).view(shape)})
