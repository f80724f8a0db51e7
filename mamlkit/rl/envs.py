"""Vectorised environments with a Gymnasium-like API, batched over tasks and trajectories.

Every environment here steps ``[T, N]`` copies at once: T tasks (one goal each) times N
trajectories per task. ``reset() -> (obs, info)`` and ``step(action) -> (obs, reward,
terminated, truncated, info)`` follow Gymnasium's names and meanings, with a leading
``[T, N]`` on every array. Sub-environments that terminated stay frozen (reward 0) until the
next ``reset``: meta-RL samples whole batches of fixed-horizon episodes, so no auto-reset.

Tasks are drawn by ``sample_tasks(num_tasks, generator)``; with
:func:`mamlkit.base.batch.task_generator` they depend only on ``(seed, split, index)``.

* :class:`Nav2D`: the point-mass 2D navigation of Finn et al. 2017 §5.3 (pure torch).
* :class:`HalfCheetahTasks`: HalfCheetah velocity / direction on ``gymnasium`` + ``mujoco``
  (the optional ``rl`` extra), see :mod:`mamlkit.rl.cheetah`.
* :class:`~mamlkit.rl.metaworld.MetaWorldTasks`: Meta-World's ML1 and ML10 (the optional ``metaworld``
  extra), see :mod:`mamlkit.rl.metaworld`. Its task rows name a split of the benchmark, and training
  refuses rows of its test split (:func:`check_train_tasks`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from mamlkit.rl.families import family_of, hook


class TaskEnv(Protocol):
    """A batch of ``[T, N]`` environments: T tasks, N trajectories per task."""

    obs_dim: int
    act_dim: int
    horizon: int
    num_envs: int  # N

    def reset(self, *, seed: int | None = None) -> tuple[Tensor, dict[str, Any]]: ...

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]: ...


class Nav2D:
    """2D navigation with a point mass (Finn et al. 2017, §5.3; rllab's ``PointEnv``).

    The agent starts at the origin; its observation is its position ``[x, y]``; an action is a
    displacement, clipped to ``[-max_action, max_action]`` per coordinate; the reward is the
    negative Euclidean distance to the task's goal after the move. An episode terminates when
    both coordinates are within ``goal_tol`` of the goal, and is truncated after ``horizon`` steps.

    Args:
        goals: ``[T, 2]`` task goals (from :meth:`sample_tasks`).
        num_envs: N, trajectories per task.
        horizon: episode length (paper: 100).
        action_scale: the policy's action is divided by this before clipping (``mamlkit rl``'s default 10 is
            the paper's code: rllab's ``normalize`` maps [-1, 1] onto [-0.1, 0.1]).
    """

    obs_dim = 2
    act_dim = 2

    def __init__(self, goals: Tensor, num_envs: int, horizon: int = 100, max_action: float = 0.1,
                 goal_tol: float = 0.01, action_scale: float = 1.0):
        if goals.dim() != 2 or goals.shape[1] != 2:
            raise ValueError(f"goals must have shape [T, 2], got {tuple(goals.shape)}")
        self.goals, self.num_envs, self.horizon, self.action_scale = goals, num_envs, horizon, action_scale
        self.max_action, self.goal_tol = max_action, goal_tol
        self.reset()

    @staticmethod
    def sample_tasks(num_tasks: int, generator: torch.Generator, low: float = -0.5, high: float = 0.5
                     ) -> Tensor:
        """Goals ``[T, 2]`` uniform in ``[low, high]²`` (paper: ``[-0.5, 0.5]²``), float64."""
        return low + (high - low) * torch.rand(num_tasks, 2, generator=generator, dtype=torch.float64)

    def reset(self, *, seed: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Start every copy at the origin. ``seed`` is accepted for API parity: the start is fixed."""
        T = self.goals.shape[0]
        self.pos = torch.zeros(T, self.num_envs, 2, dtype=self.goals.dtype)
        self.done = torch.zeros(T, self.num_envs, dtype=torch.bool)
        self.t = 0
        return self.pos.clone(), {}

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """``action [T, N, 2]`` -> ``obs [T, N, 2]``, ``reward [T, N]``, ``terminated``, ``truncated``
        (bool ``[T, N]``) and ``info`` with ``"active"``: the copies this step counted for."""
        active = ~self.done
        a = (action.detach().to(self.pos.dtype) / self.action_scale).clamp(-self.max_action, self.max_action)
        self.pos = torch.where(active[..., None], self.pos + a, self.pos)
        diff = self.pos - self.goals[:, None, :]
        reward = torch.where(active, -diff.norm(dim=-1), torch.zeros((), dtype=self.pos.dtype))
        terminated = active & (diff.abs() < self.goal_tol).all(-1)
        self.t += 1
        truncated = active & ~terminated & (self.t >= self.horizon)
        self.done = self.done | terminated | truncated
        return self.pos.clone(), reward, terminated, truncated, {"active": active}


def make_nav2d(name: str, tasks: Tensor, num_envs: int, horizon: int, action_scale: float) -> Nav2D:
    """The nav2d family's environments (:mod:`mamlkit.rl.families`)."""
    return Nav2D(tasks, num_envs, horizon, action_scale=action_scale)


def nav2d_tasks(name: str, num_tasks: int, generator: torch.Generator, split: str, seed: int) -> Tensor:
    """Goals ``[T, 2]`` uniform in ``[-0.5, 0.5]²``; every split from one distribution."""
    return Nav2D.sample_tasks(num_tasks, generator)


def cheetah_vel_tasks(name: str, num_tasks: int, generator: torch.Generator, split: str, seed: int) -> Tensor:
    """Target velocities ``[T, 1]`` ~ U[0, 2] (paper, App. A.2)."""
    return 2.0 * torch.rand(num_tasks, 1, generator=generator, dtype=torch.float64)


def cheetah_dir_tasks(name: str, num_tasks: int, generator: torch.Generator, split: str, seed: int) -> Tensor:
    """Directions ``[T, 1]``: forward (+1) or backward (-1), equally likely."""
    return torch.randint(0, 2, (num_tasks, 1), generator=generator).double() * 2 - 1


def make_env(name: str, tasks: Tensor, num_envs: int, horizon: int, action_scale: float = 1.0,
             **settings: Any) -> TaskEnv:
    """Build environment ``name`` for ``tasks`` (from :func:`sample_tasks`) with N copies per task; the
    environment divides the policy's actions by ``action_scale`` before clipping them to its range.
    ``settings``: values of the family's own options (:meth:`EnvFamily.settings` of a run config, such as
    Meta-World's ``reward_version``), which its ``make`` takes by name; one the family does not own is refused,
    so that a setting meant for another family never goes unused."""
    family = family_of(name)
    owned = {f for c in family.options for f in c.__dataclass_fields__}
    stray = sorted(set(settings) - owned)
    if stray:
        raise TypeError(f"make_env: the {family.name} environment family takes no {', '.join(stray)}")
    return hook(family.make)(name, tasks, num_envs, horizon, action_scale, **settings)


def sample_tasks(name: str, num_tasks: int, generator: torch.Generator, split: str = "train",
                 seed: int = 0) -> Tensor:
    """Task parameters ``[T, d]`` of environment ``name``: goals, target velocities or directions.

    ``split`` and ``seed`` matter to Meta-World only, whose tasks are fixed lists: its benchmark of seed
    ``seed`` gives ``"test"`` rows from its test split and every other split's rows from its train split.
    The other environments draw every split from one distribution (the generator keeps them apart)."""
    return hook(family_of(name).sample)(name, num_tasks, generator, split, seed)


def action_limit(name: str) -> float:
    """The bound the environment clips its (scaled) actions to: ±0.1 moves (nav2d), ±1 torques (cheetah)."""
    return family_of(name).action_limit


def env_dims(name: str) -> tuple[int, int]:
    """``(obs_dim, act_dim)`` of environment ``name`` without building it."""
    return family_of(name).dims


def check_env(name: str) -> None:
    """Refuse (``UserError``) an environment the installed packages lack: Meta-World's families need its
    package, and their task must be one of its ML1 tasks."""
    family = family_of(name)
    if family.check is not None:
        hook(family.check)(name)


def check_train_tasks(name: str, tasks: Tensor) -> None:
    """Raise if ``tasks`` holds a task of a benchmark's test split: training must never see one (Meta-World
    PR #573 found its `ML1-train` used the test split). Only Meta-World's task rows name a split."""
    family = family_of(name)
    if family.check_train is not None:
        hook(family.check_train)(tasks)


def env_record(cfg: Any) -> dict[str, Any]:
    """What a checkpoint and a report record of the environment of run config ``cfg`` beyond the config: for
    Meta-World the package's version and the reward functions'; nothing for the environments mamlkit
    implements."""
    family = family_of(cfg.env)
    return {} if family.record is None else hook(family.record)(cfg.env, **family.settings(cfg))
