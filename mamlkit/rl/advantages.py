"""Returns, the linear feature baseline and generalised advantage estimation (GAE).

All functions take batches ``[..., H]`` of fixed-length episodes with a validity ``mask``
(1 while the episode runs, 0 after it terminated), so T tasks x N trajectories go at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R_t = Σ_{l>=0} γ^l r_{t+l} within each episode: ``rewards, mask [..., H]`` -> ``[..., H]``."""
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (rewards[..., t] + gamma * running) * mask[..., t]
        out[..., t] = running
    return out


def baseline_features(obs: Tensor, horizon_scale: float = 100.0) -> Tensor:
    """The paper's linear-baseline features (rllab's ``LinearFeatureBaseline``).

    ``obs [..., H, d]`` -> ``[..., H, 2d + 4]``: clip(o, ±10), its square, t/100, (t/100)², (t/100)³, 1.
    """
    o = obs.clamp(-10, 10)
    H = obs.shape[-2]
    t = torch.arange(H, dtype=obs.dtype) / horizon_scale
    t = t.reshape((1,) * (obs.dim() - 2) + (H, 1)).expand(*obs.shape[:-1], 1)
    return torch.cat([o, o * o, t, t * t, t ** 3, torch.ones_like(t)], dim=-1)


def fit_linear_baseline(features: Tensor, targets: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Ridge regression of ``targets`` on ``features`` over the valid steps, one fit per task.

    ``features [T, N, H, F]``, ``targets, mask [T, N, H]`` -> weights ``[T, F]`` solving
    ``(XᵀWX + reg·I) w = XᵀW y`` (W the mask). As in rllab, ``reg`` grows tenfold while the
    solution is not finite. Solved in float64.
    """
    X = features.double().flatten(1, 2)
    y = targets.double().flatten(1, 2)
    w = mask.double().flatten(1, 2)
    A = torch.einsum("tnf,tn,tng->tfg", X, w, X)
    b = torch.einsum("tnf,tn,tn->tf", X, w, y)
    eye = torch.eye(X.shape[-1], dtype=torch.float64)
    for _ in range(5):
        coef = torch.linalg.solve(A + reg * eye, b)
        if torch.isfinite(coef).all():
            break
        reg *= 10
    return coef.to(features.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates (Schulman et al. 2016): ``[..., H]`` -> ``[..., H]``.

    δ_t = r_t + γ V(s_{t+1}) − V(s_t) and A_t = Σ_l (γλ)^l δ_{t+l}, where V after the last
    valid step of an episode is 0 (the convention of rllab's MAML experiments, which also
    bootstrap truncated episodes with 0).
    """
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[..., 0])
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = (delta + gamma * lam * running) * mask[..., t]
        adv[..., t] = running
        next_value = values[..., t] * mask[..., t]
    return adv


def normalize(adv: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Centre and scale advantages per task over valid steps: ``[T, N, H]`` -> ``[T, N, H]``."""
    m = mask.to(adv.dtype)
    n = m.sum((1, 2), keepdim=True).clamp_min(1)
    mean = (adv * m).sum((1, 2), keepdim=True) / n
    var = ((adv - mean).pow(2) * m).sum((1, 2), keepdim=True) / n
    return (adv - mean) / (var.sqrt() + eps) * m
