"""HalfCheetah velocity and direction tasks (Finn et al. 2017, §5.3) on ``gymnasium`` + ``mujoco``.

Needs the optional extra: ``pip install 'mamlkit[rl]'``. The simulator is gymnasium's
``HalfCheetah-v5`` (17 observations, 6 torques in [-1, 1], dt = 0.05 s); the task decides the
reward, as in the paper:

* ``cheetah-vel``: r = −|v_x − v_goal| − 0.05·‖a‖², v_goal ~ U[0, 2];
* ``cheetah-dir``: r = d·v_x − 0.05·‖a‖², d ∈ {−1, +1} (backward or forward);

where a = clip(policy action / ``action_scale``, ±1) is the torque applied (and penalised) and v_x
the torso's forward velocity over the step. ``action_scale`` 10 (the default of ``mamlkit rl``) is
pytorch-maml-rl's ``normalization_scale`` for these tasks; 1 is rllab's [-1, 1] normalisation.

The ``T·N`` simulators are stepped in one process (MuJoCo steps take microseconds; processes
would cost more than they save on 2 cores) behind the same ``[T, N]`` API as :class:`~mamlkit.rl.envs.Nav2D`;
the policy is evaluated once per time step for all of them, and each simulator is stepped by MuJoCo's own
calls, the ones gymnasium's ``HalfCheetah-v5.step`` makes, without its per-step Python (checks, reward
terms, info dict, arrays built per call), which made sampling 1.2-1.3x slower (``benchmarks/rl_sampling.py
steps cheetah-dir``). Several ranks (``torchrun``, docs/rl.md) share the simulators out.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamlkit.base.errors import UserError

CTRL_COST = 0.05
log = logging.getLogger("mamlkit")
_POOL: list[Any] = []  # simulators are reused across batches: building one parses the model XML


def _simulators(n: int) -> list[Any]:
    try:
        import gymnasium as gym
        import mujoco  # noqa: F401
    except ImportError:
        raise UserError("the half-cheetah environments need gymnasium and mujoco: pip install 'mamlkit[rl]'"
                        ) from None
    while len(_POOL) < n:
        with _mujoco_warnings_to_log():
            _POOL.append(gym.make("HalfCheetah-v5").unwrapped)
    return _POOL[:n]


@contextlib.contextmanager
def _mujoco_warnings_to_log():
    """Route MuJoCo's warnings to the ``mamlkit`` logger (debug level). By default MuJoCo prints them
    and appends them to ``MUJOCO_LOG.TXT`` in the working directory; its model compiler warns about a
    deprecated attribute of gymnasium's half-cheetah model once per simulator built."""
    import mujoco

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda msg: log.debug("mujoco: %s", msg))
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


class HalfCheetahTasks:
    """``[T, N]`` HalfCheetah simulators; ``tasks [T, 1]`` holds goal velocities or directions."""

    obs_dim = 17
    act_dim = 6

    def __init__(self, name: str, tasks: Tensor, num_envs: int, horizon: int = 200, action_scale: float = 1.0):
        if name not in ("cheetah-vel", "cheetah-dir"):
            raise ValueError(f"unknown half-cheetah task {name!r}")
        self.name, self.tasks, self.num_envs, self.horizon = name, tasks.double(), num_envs, horizon
        self.action_scale = action_scale
        self.T = tasks.shape[0]
        self.sims = _simulators(self.T * num_envs)
        self.t = 0

    def reset(self, *, seed: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Reset every simulator (its initial-state noise seeded with ``seed + i``)."""
        obs = [sim.reset(seed=None if seed is None else seed + i)[0] for i, sim in enumerate(self.sims)]
        self.t = 0
        return torch.from_numpy(np.stack(obs)).view(self.T, self.num_envs, -1), {}

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        a = (action.detach().double() / self.action_scale).clamp(-1, 1).reshape(self.T * self.num_envs, -1).numpy()
        obs, vel = _step_all(self.sims, a)
        v = torch.from_numpy(vel).view(self.T, self.num_envs)
        goal = self.tasks[:, :1]
        forward = -(v - goal).abs() if self.name == "cheetah-vel" else goal * v
        reward = forward - CTRL_COST * torch.from_numpy(a).view(self.T, self.num_envs, -1).pow(2).sum(-1)
        self.t += 1
        shape = (self.T, self.num_envs)
        truncated = torch.full(shape, self.t >= self.horizon)
        return (torch.from_numpy(obs).view(self.T, self.num_envs, -1), reward,
                torch.zeros(shape, dtype=torch.bool), truncated,
                {"active": torch.ones(shape, dtype=torch.bool), "x_velocity": v})


def _step_all(sims: list[Any], actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step every simulator once with its torque ``actions[i]`` as gymnasium's ``HalfCheetah-v5.step`` does
    (the same MuJoCo calls, so the same numbers: tests/test_rl.py): ``(observations [n, 17], x velocities [n])``."""
    import mujoco

    n = len(sims)
    obs, vel = np.empty((n, HalfCheetahTasks.obs_dim)), np.empty(n)
    if not n:
        return obs, vel
    skip = sims[0].frame_skip
    dt = sims[0].model.opt.timestep * skip  # gymnasium's ``dt``
    nq = sims[0].model.nq
    for i, sim in enumerate(sims):
        model, data = sim.model, sim.data
        before = data.qpos[0]
        data.ctrl[:] = actions[i]
        mujoco.mj_step(model, data, nstep=skip)
        mujoco.mj_rnePostConstraint(model, data)  # as gymnasium: the state after a step is the same
        vel[i] = (data.qpos[0] - before) / dt
        obs[i, :nq - 1] = data.qpos[1:]  # the torso's x is left out of the observation
        obs[i, nq - 1:] = data.qvel
    return obs, vel
