"""Evaluation of meta-RL policies: returns after 0..K adaptation steps beside the paper, and figures.

Every policy is evaluated on the same fixed test tasks (``task_generator(seed, "test", 0)``) with
the same sampling noise, so differences between policies are not sampling luck. Each
adaptation step samples ``cfg.test_traj`` fresh episodes per task with the current parameters and
takes one policy-gradient step (rates ``cfg.eval_lrs``, paper: 0.1 then 0.05).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from mamlkit.base.batch import task_generator
from mamlkit.base.metrics import mean_ci
from mamlkit.checkpoint import atomic_write, atomic_write_text
from mamlkit.rl.config import RLConfig
from mamlkit.rl.envs import sample_tasks
from mamlkit.rl.maml_trpo import MAMLTRPO
from mamlkit.runfolder import register_run_files


def test_tasks(cfg: RLConfig, num_tasks: int | None = None) -> Tensor:
    return sample_tasks(cfg.env, num_tasks or cfg.eval_tasks, task_generator(cfg.seed, "test", 0), "test", cfg.seed)


def adaptation_curve(policy: nn.Module, cfg: RLConfig, tasks: Tensor) -> Tensor:
    """Mean episode return per task after 0..K steps, ``[T, K+1]`` (K = ``len(cfg.eval_lrs)``)."""
    gen = task_generator(cfg.seed, "test", 0, "rollouts")
    curve, _ = MAMLTRPO(policy, cfg).adapt_curve(tasks, cfg.eval_lrs, gen, cfg.test_traj)
    return curve


def planned(requested: int | None, cfg: RLConfig) -> contextlib.AbstractContextManager:
    """The thread plan of `rl eval` and `rl adapt`, as `mamlkit train`'s (:mod:`mamlkit.exec.threads`):
    ``--threads N``, else the run's; 0 is mamlkit's choice, one intra-op thread on the CPU, which keeps a
    fair share of a busy machine. The caller's settings come back when the block ends."""
    from mamlkit.exec import threads

    return threads.planned(threads.choose(cfg.threads if requested is None else requested))


def _fmt(mean: float, ci: float) -> str:
    return f"{mean:.2f} ± {ci:.2f}"


def step_rates(lrs: tuple[float, ...], num_steps: int) -> tuple[float, ...]:
    """The rates of test steps 1..``num_steps``: ``lrs`` (paper: 0.1, 0.05, 0.05), its last rate repeated
    beyond its length. Finn et al. 2017, App. A.2: "During evaluation, we found that halving the learning
    rate after the first gradient step produced superior performance" (their test_maml_point.py:
    ``init_learning_rate`` α, then 0.5 α; there the nav2d policy of the paper's table was trained and
    tested with α = 0.5, not the text's 0.1: ``--inner-lr 0.5 --eval-lrs 0.5 0.25``)."""
    return tuple(lrs[:num_steps]) + (lrs[-1],) * max(0, num_steps - len(lrs))


REPORT_FILES = ("eval.md", "eval.json", "returns_vs_steps.png", "figure4_trajectories.png")
register_run_files(*REPORT_FILES)  # a run's manifest may name them; --overwrite removes them


def report(run_dir: Path, policies: dict[str, nn.Module], cfg: RLConfig,
           show: tuple[int, ...] | None = None) -> str:
    """Evaluate ``policies`` (name -> policy); write ``eval.json``, ``eval.md``, figures (:data:`REPORT_FILES`)
    into ``run_dir``; return the table.

    ``show``: the step counts whose rows the table lists (0 always; default: every step of ``cfg.eval_lrs``).
    """
    tasks = test_tasks(cfg)
    curves = {name: adaptation_curve(p, cfg, tasks) for name, p in policies.items()}
    steps = [0, *sorted(set(show))] if show else range(len(cfg.eval_lrs) + 1)
    paper = cfg.family.paper  # the paper's MAML returns after 0..3 steps, where it reports the env
    names = list(policies)
    lines = [f"{cfg.env}: average return per episode after k policy-gradient steps (rates "
             f"{list(cfg.eval_lrs)}), mean ± 95% CI over {tasks.shape[0]} fixed test tasks, "
             f"{cfg.test_traj} episodes per task and step.",
             "", "| steps | " + " | ".join(names) + (" | paper (MAML) |" if paper else " |"),
             "|---|" + "---|" * (len(names) + (1 if paper else 0))]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for k in steps:
        cells = []
        for n in names:
            m, ci = mean_ci(curves[n][:, k])
            table.setdefault(n, {})[str(k)] = {"mean": m, "ci95": ci}
            cells.append(_fmt(m, ci))
        tail = f" | {paper[k]:.2f}" if paper and k < len(paper) else (" | —" if paper else "")
        lines.append(f"| {k} | " + " | ".join(cells) + tail + " |")
    gains = [_fmt(*mean_ci(curves[n][:, 1] - curves[n][:, 0])) for n in names] if len(steps) > 1 else []
    if gains:
        tail = f" | {paper[1] - paper[0]:.2f}" if paper else ""
        lines.append("| gain 0→1 | " + " | ".join(gains) + tail + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "eval.json", json.dumps({"env": cfg.env, "num_tasks": int(tasks.shape[0]),
                                                         "eval_lrs": list(cfg.eval_lrs), "returns": table,
                                                         "paper": paper}, indent=2))
    atomic_write_text(run_dir / "eval.md", text)
    curve_figure(run_dir / "returns_vs_steps.png", curves, paper)
    if cfg.family.trajectories:  # agents in the plane: the paper's figure 4
        trajectory_figure(run_dir / "figure4_trajectories.png", policies, cfg)
    return text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_figure(path: Path, curves: dict[str, Tensor], paper) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, c in curves.items():
        c = c.double()
        x = torch.arange(c.shape[1])
        mean, ci = c.mean(0), 1.96 * c.std(0) / c.shape[0] ** 0.5
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, mean - ci, mean + ci, alpha=0.25)
    if paper:
        ax.plot(range(len(paper)), paper, "k--", marker="x", label="paper (MAML)")
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("average return")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))  # never half a figure
    plt.close(fig)


def trajectory_figure(path: Path, policies: dict[str, nn.Module], cfg: RLConfig, num_goals: int = 4,
                      tasks: Tensor | None = None, shown_steps: tuple[int, ...] | None = None) -> list[Tensor]:
    """Finn et al. Fig. 4: mean-action trajectories before and after each of the K steps, per goal and policy.

    ``tasks [G, 2]``: the goals (default: the first ``num_goals`` test tasks); ``shown_steps``: the step
    counts drawn (default 0..K, K = ``len(cfg.eval_lrs)``). Returns, per policy, the adaptation curve
    ``[G, K+1]`` (mean return of the sampled episodes after 0..K steps) that the trajectories come from.
    """
    plt = _plt()
    tasks = test_tasks(cfg, num_goals) if tasks is None else tasks
    num_goals = tasks.shape[0]
    K = len(cfg.eval_lrs)
    shown_steps = tuple(dict.fromkeys(shown_steps if shown_steps is not None else range(K + 1)))
    names = list(policies)
    fig, axes = plt.subplots(len(names), num_goals, figsize=(3.2 * num_goals, 3.2 * len(names)),
                             squeeze=False)
    curves = []
    for row, name in enumerate(names):
        algo = MAMLTRPO(policies[name], cfg)
        gen = task_generator(cfg.seed, "figure", 0)
        curve, path_params = algo.adapt_curve(tasks, cfg.eval_lrs, gen, cfg.test_traj)
        curves.append(curve)
        for k in (k for k in shown_steps if 0 <= k < len(path_params)):
            style = ":" if k == 0 else "--" if k == 1 else "-" if k == K else "-."
            label = "pre-update" if k == 0 else f"{k} grad step{'s' * (k > 1)}"
            ep = algo.sample(tasks, path_params[k], k > 0, gen, num_traj=1, deterministic=True)
            for g in range(num_goals):
                m = ep.mask[g, 0].bool()
                pos = torch.cat([torch.zeros(1, 2, dtype=ep.obs.dtype), ep.obs[g, 0, m] +
                                 (ep.actions[g, 0, m] / cfg.env_action_scale).clamp(-0.1, 0.1)]).double()
                axes[row][g].plot(pos[:, 0], pos[:, 1], style, label=label)
        for g in range(num_goals):
            ax = axes[row][g]
            ax.scatter([tasks[g, 0].item()], [tasks[g, 1].item()], marker="*", s=150, color="red",
                       label="goal", zorder=5)
            ax.set_xlim(-0.6, 0.6)
            ax.set_ylim(-0.6, 0.6)
            ax.set_aspect("equal")
            ax.set_title(f"{name}, goal {g}" if num_goals > 1 or len(names) > 1 else
                         f"goal ({tasks[g, 0].item():.2f}, {tasks[g, 1].item():.2f})", fontsize=9)
        axes[row][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))  # never half a figure
    plt.close(fig)
    return curves
