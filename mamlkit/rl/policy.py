"""The Gaussian MLP policy (a plain ``nn.Module``) and its log-likelihood and KL.

The module's output packs the distribution: ``forward(obs) -> [..., 2·act_dim]``, the mean
followed by the log standard deviation (a learned, state-independent parameter broadcast to
every state). Packing lets the policy run through :func:`mamlkit.engine.functional.call` and the
engine's per-task functions exactly like a regression model: ``pred = model(x)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mamlkit.models import mlp


class GaussianMLPPolicy(nn.Module):
    """π(a|s) = N(μ_θ(s), diag σ²): μ an MLP (paper: two hidden layers of 100 ReLU units), log σ learned.

    Args:
        obs_dim, act_dim: sizes of observations and actions.
        hidden: hidden widths.
        init_std: σ at initialisation (rllab's default 1.0).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (100, 100),
                 init_std: float = 1.0):
        super().__init__()
        self.mean = mlp(obs_dim, hidden, act_dim)
        for m in self.mean:
            if isinstance(m, nn.Linear):  # Xavier weights and zero biases, as rllab's MLPs
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> Tensor:
        """``obs [..., obs_dim]`` -> ``[..., 2·act_dim]``: mean, then log σ."""
        mu = self.mean(obs)
        return torch.cat([mu, self.log_std.expand_as(mu)], dim=-1)


def build_policy(obs_dim: int, act_dim: int, hidden: tuple[int, ...], init_std: float, seed: int,
                 dtype: torch.dtype = torch.float32) -> GaussianMLPPolicy:
    """A policy initialised from ``seed`` in a forked RNG (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = GaussianMLPPolicy(obs_dim, act_dim, tuple(hidden), init_std)
    return policy.to(dtype)


def split_dist(out: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 2a]`` -> ``(mean [..., a], log_std [..., a])``."""
    a = out.shape[-1] // 2
    return out[..., :a], out[..., a:]


def log_prob(out: Tensor, action: Tensor) -> Tensor:
    """log π(a|s) summed over action dims: ``out [..., 2a]``, ``action [..., a]`` -> ``[...]``."""
    mean, log_std = split_dist(out)
    z = (action - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def kl_divergence(old: Tensor, new: Tensor) -> Tensor:
    """KL(π_old ‖ π_new) of diagonal Gaussians, summed over action dims: ``[..., 2a]`` x2 -> ``[...]``."""
    m0, s0 = split_dist(old)
    m1, s1 = split_dist(new)
    return (s1 - s0 + (torch.exp(2 * s0) + (m0 - m1).pow(2)) * 0.5 * torch.exp(-2 * s1) - 0.5).sum(-1)
