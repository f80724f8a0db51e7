"""``mamlkit rl adapt`` for a Meta-World run: adapt the policy to one task (a test task of the benchmark, or a goal
of the user's), draw the end effector's trajectory before and after each step, and (``--video``) render those
episodes.

The steps are :meth:`~mamlkit.rl.maml_trpo.MAMLTRPO.adapt_curve`'s (the inner step of training on freshly sampled
episodes, rates ``cfg.eval_lrs``). The figure shows the hand's path (the first three numbers of Meta-World's
observation) of one mean-action episode per step count, in three projections, with the goal marked; it needs no
OpenGL. The video renders the same episodes through MuJoCo's offscreen OpenGL (:mod:`mamlkit.rl.render`), side
by side, one frame every few steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mamlkit.base.batch import task_generator
from mamlkit.checkpoint import atomic_write
from mamlkit.rl import sampling
from mamlkit.rl.config import RLConfig
from mamlkit.rl.envs import make_env
from mamlkit.rl.maml_trpo import MAMLTRPO
from mamlkit.rl.render import OffscreenRenderer, write_gif

CAMERA = "corner3"   # Meta-World's camera that shows the table, the arm and the goal from above and aside
FRAME_EVERY = 5      # a 500-step episode is 101 frames, 4 s at 25 frames a second


@torch.no_grad()
def mean_action_episode(model: nn.Module, cfg: RLConfig, row: Tensor, params: dict[str, Tensor], per_task: bool,
                        renderer: OffscreenRenderer | None = None) -> dict[str, Any]:
    """One episode of task ``row [1, 3]`` with the mean action of ``params``: the hand's positions ``[H+1, 3]``,
    the return, and whether the package's success flag was ever set; with ``renderer``, also ``frames`` (the
    scene at step 0 and every :data:`FRAME_EVERY` steps, and the last) and ``frame_steps`` (each frame's time step
    and whether success was reached by then)."""
    env = make_env(cfg.env, row, 1, cfg.episode_len, cfg.env_action_scale, **cfg.family.settings(cfg))
    obs, _ = env.reset()
    dtype = next(model.parameters()).dtype
    policy = sampling.policy_fn(model, params, per_task)
    hand, ret, success = [obs[0, 0, :3].double()], 0.0, False
    frames, frame_steps = [], []

    def shoot(t: int) -> None:
        sim = env.sims[0]
        frames.append(renderer.frame(sim.model, sim.data))
        frame_steps.append((t, success))

    if renderer is not None:
        shoot(0)
    for t in range(1, env.horizon + 1):
        mean = policy(obs.to(dtype))[..., :env.act_dim]
        obs, reward, _, truncated, info = env.step(mean)
        hand.append(obs[0, 0, :3].double())
        ret += reward[0, 0].item()
        success |= bool(info["success"][0, 0].item())
        if renderer is not None and (t % FRAME_EVERY == 0 or truncated.all()):
            shoot(t)
        if truncated.all():
            break
    out = {"hand": torch.stack(hand).numpy(), "return": ret, "success": success}
    return out | ({"frames": frames, "frame_steps": frame_steps} if renderer is not None else {})


def adapt(model: nn.Module, cfg: RLConfig, row: Tensor, generator: torch.Generator | None = None,
          renderer: OffscreenRenderer | None = None) -> dict[str, Any]:
    """Adapt to task ``row [1, 3]`` with ``len(cfg.eval_lrs)`` steps of ``cfg.test_traj`` sampled episodes each
    (noise from ``generator``, default ``task_generator(cfg.seed, "adapt", 0)``).

    Returns the parameters after 0..K steps (``path``), the mean return of the sampled episodes per step count
    (``sampled``) and a mean-action episode per step count (``episodes``, :func:`mean_action_episode`; rendered
    by ``renderer`` if given)."""
    gen = task_generator(cfg.seed, "adapt", 0) if generator is None else generator
    curve, path = MAMLTRPO(model, cfg).adapt_curve(row, cfg.eval_lrs, gen, cfg.test_traj)
    episodes = [mean_action_episode(model, cfg, row, p, k > 0, renderer) for k, p in enumerate(path)]
    return {"path": path, "sampled": curve[0].tolist(), "episodes": episodes}


def trajectory_figure(path: Path, episodes: list[dict[str, Any]], goal: np.ndarray, title: str) -> None:
    """The hand's path of each episode (pre-update, then after each step) in the x-y, x-z and y-z planes, the
    goal marked; written whole or not at all."""
    from mamlkit.rl.evaluate import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    planes = ((0, 1), (0, 2), (1, 2))
    for k, ep in enumerate(episodes):
        label = ("pre-update" if k == 0 else f"{k} grad step{'s' * (k > 1)}") + (", success" if ep["success"] else "")
        style = ":" if k == 0 else "-"
        for ax, (i, j) in zip(axes, planes):
            ax.plot(ep["hand"][:, i], ep["hand"][:, j], style, marker=".", markersize=3, label=label)
    for ax, (i, j) in zip(axes, planes):
        ax.scatter([episodes[0]["hand"][0, i]], [episodes[0]["hand"][0, j]], marker="o", color="black", s=30,
                   label="start", zorder=5)
        ax.scatter([goal[i]], [goal[j]], marker="*", s=150, color="red", label="goal", zorder=6)
        ax.set_xlabel("xyz"[i])
        ax.set_ylabel("xyz"[j])
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), dpi=110))
    plt.close(fig)


def rollout_video(path: Path, episodes: list[dict[str, Any]], fps: int = 25) -> int:
    """The rendered episodes of :func:`adapt` (pre-update, then after each step) side by side as an animated GIF,
    each panel labelled with its step count, the time step, and success once reached; returns the frames."""
    labels = []
    for k, ep in enumerate(episodes):
        name = "pre-update" if k == 0 else f"{k} grad step{'s' * (k > 1)}"
        labels.append([f"{name}, t={t}" + (", success" if ok else "") for t, ok in ep["frame_steps"]])
    return write_gif(path, [ep["frames"] for ep in episodes], labels, fps)


def task_goal(env: str, row: Tensor) -> np.ndarray:
    """The goal (x, y, z) of task ``row [1, 3]``: the last three numbers of its ``rand_vec``."""
    import pickle

    from mamlkit.rl.metaworld import resolve

    return np.asarray(pickle.loads(resolve(env, row)[0].data)["rand_vec"], dtype=np.float64)[-3:]
