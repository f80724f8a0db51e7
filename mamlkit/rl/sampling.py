"""Sampling episodes from a batch of task environments, and packing them for the engine.

A packed batch is the engine's ``(x, y)`` pair per task: ``x`` the states ``[T, N·H, obs_dim]``,
``y`` the actions, advantages and validity mask (and, for the outer objective, the sampling
policy's distribution parameters), so the policy-gradient loss is ``loss_fn(model(x), y)``
exactly as a supervised loss is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mamlkit.base.stops import stop_point
from mamlkit.engine.functional import call
from mamlkit.exec.executor import Executor
from mamlkit.rl.advantages import baseline_features, discounted_returns, fit_linear_baseline, gae, normalize
from mamlkit.rl.envs import TaskEnv
from mamlkit.rl.policy import split_dist

PolicyFn = Callable[[Tensor], Tensor]  # obs [T, N, d] -> [T, N, 2a]


@dataclass
class Episodes:
    """Fixed-horizon episodes of T tasks x N trajectories: ``obs [T, N, H, d]``, ``actions [T, N, H, a]``,
    ``rewards, mask [T, N, H]`` (mask: 1 while the episode runs) and ``dist [T, N, H, 2a]``
    (the sampling policy's mean and log σ at each state); ``success [T, N]``: whether the episode succeeded at
    any step, for environments that say so (``info["success"]``, Meta-World's), else None."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    dist: Tensor
    success: Tensor | None = None

    def returns(self) -> Tensor:
        """Undiscounted return of each episode, ``[T, N]``."""
        return (self.rewards * self.mask).sum(-1)


def task_executor(model: nn.Module) -> Executor:
    """The executor of a policy's per-task work where the caller names none: vmap over the tasks, under the
    thread count the caller set (``rl train``'s ``--threads``, ``rl eval``'s plan), which its plan keeps."""
    return Executor(model, "vmap", threads=torch.get_num_threads())


def policy_fn(model: nn.Module, params: Mapping[str, Tensor], per_task: bool,
              executor: Executor | None = None) -> PolicyFn:
    """``obs [T, N, d] -> [T, N, 2a]`` with shared ``params`` (one batched call), or per-task ones (leading
    dim T), each task's run by ``executor`` (default: :func:`task_executor`)."""
    if not per_task:
        return lambda obs: call(model, params, {}, obs)
    run = executor or task_executor(model)
    return lambda obs: run.map(lambda p, o: call(model, p, {}, o), dict(params), obs)


@dataclass(frozen=True)
class Share:
    """This process's block ``rows`` of a meta-batch of ``total`` tasks sampled across ranks.

    ``longest(n)``: the most steps any rank's rollout ran, given that this one ran ``n`` (a maximum over
    the ranks). With it the ranks draw exactly the numbers one process draws for the whole batch: each
    step's noise for all ``total`` tasks (this block kept), and the draws of the steps the other ranks
    still ran after this one's episodes all ended, so the generator leaves the rollout where one process's
    does and the next rollout and the Fisher's subsample start from the same state.
    """

    rows: range
    total: int
    longest: Callable[[int], int]


@torch.no_grad()
def rollout(env: TaskEnv, policy: PolicyFn, generator: torch.Generator, dtype: torch.dtype = torch.float32,
            deterministic: bool = False, share: Share | None = None) -> Episodes:
    """Run every copy of ``env`` for ``env.horizon`` steps with actions a ~ π(·|s) (noise from ``generator``).

    The policy is evaluated once per time step for all ``[T, N]`` copies. ``deterministic=True`` takes the
    mean action (for plots). With ``share``, ``env`` holds only tasks ``share.rows`` of the batch and the
    episodes are those rows of one process's rollout of the whole batch (see :class:`Share`).
    """
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    # copy i of the batch is reset with seed + i (Gymnasium's vector-env convention) on every rank
    obs, _ = env.reset(seed=seed + (share.rows.start * env.num_envs if share else 0))
    obs_l, act_l, rew_l, mask_l, dist_l = [], [], [], [], []
    success = None  # [T, N]: succeeded at a step while running, where the environment reports success
    for _ in range(env.horizon):
        stop_point()  # a stop signal may end validation and evaluation here (mamlkit.base.stops)
        o = obs.to(dtype)
        out = policy(o)
        mean, log_std = split_dist(out)
        noise = _noise(mean.shape, generator, share).to(dtype)
        action = mean if deterministic else mean + torch.exp(log_std) * noise
        obs, reward, _, _, info = env.step(action)
        obs_l.append(o)
        act_l.append(action)
        rew_l.append(reward.to(dtype))
        mask_l.append(info["active"])
        dist_l.append(out)
        if "success" in info:
            hit = info["success"].bool() & info["active"].bool()
            success = hit if success is None else success | hit
        if not info["active"].any():
            break
    if share is not None:  # the draws of the steps other ranks still ran (their outputs are not kept here)
        for _ in range(share.longest(len(obs_l)) - len(obs_l)):
            _noise(mean.shape, generator, share)
    pad = env.horizon - len(obs_l)  # every copy finished early: pad with invalid steps
    for lst in (obs_l, act_l, rew_l, mask_l, dist_l):
        lst.extend([torch.zeros_like(lst[-1])] * pad)
    return Episodes(*(torch.stack(lst, dim=2) for lst in (obs_l, act_l, rew_l, mask_l, dist_l)), success=success)


def _noise(shape: torch.Size, generator: torch.Generator, share: Share | None) -> Tensor:
    """One step's standard normal noise ``[T, N, a]`` in float64; with ``share``, drawn for the whole
    batch and this block's rows kept."""
    if share is None:
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    whole = torch.randn((share.total, *shape[1:]), generator=generator, dtype=torch.float64)
    return whole[share.rows.start:share.rows.stop]


def advantages(ep: Episodes, gamma: float, lam: float) -> Tensor:
    """Normalised GAE advantages ``[T, N, H]`` with the linear feature baseline fitted per task."""
    mask = ep.mask
    returns = discounted_returns(ep.rewards, mask, gamma)
    feats = baseline_features(ep.obs)
    coef = fit_linear_baseline(feats, returns, mask)
    values = torch.einsum("tnhf,tf->tnh", feats, coef)
    return normalize(gae(ep.rewards, values, mask, gamma, lam), mask)


def pack(ep: Episodes, gamma: float, lam: float, with_dist: bool) -> tuple[Tensor, Tensor]:
    """``(x [T, N·H, d], y [T, N·H, a + 2 (+ 2a)])``: states; actions, advantage, mask (, old mean/log σ)."""
    T = ep.obs.shape[0]
    adv = advantages(ep, gamma, lam)
    cols = [ep.actions, adv[..., None], ep.mask.to(adv.dtype)[..., None]]
    if with_dist:
        cols.append(ep.dist)
    y = torch.cat(cols, dim=-1)
    return ep.obs.reshape(T, -1, ep.obs.shape[-1]), y.reshape(T, -1, y.shape[-1])
