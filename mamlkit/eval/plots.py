"""Figures as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch

from mamlkit.base.batch import task_generator
from mamlkit.checkpoint import atomic_write
from mamlkit.engine.functional import call
from mamlkit.tasks.sinusoid import Sinusoid


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically: a full disk leaves the old figure or none, never half of one."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def sinusoid_figures(run_dir: Path, learners: dict, results: dict, cfg) -> None:
    """Finn et al. Fig. 2 (fits before and after 1 and 10 steps) and Fig. 3 (MSE against steps).

    Both fine-tune as the table does (the learner's own rule, guarded with ``cfg.test_guard``). Figure 3 plots the
    mean over the test tasks with its 95% CI band on a log scale, the band's lower edge kept above zero,
    so that every K stays readable whatever the spread."""
    plt = _plt()
    dtype = getattr(torch, cfg.dtype)
    k = min(cfg.eval_shots)
    dist = Sinusoid(k_support=k, k_query=1)
    gen = task_generator(cfg.seed, "figure", 0)
    amp, phase = dist.sample_params(3, gen)
    x = -5 + 10 * torch.rand(3, k, 1, generator=gen, dtype=torch.float64)
    y = amp[:, None, None] * torch.sin(x - phase[:, None, None])
    grid = torch.linspace(-5, 5, 200, dtype=torch.float64)
    truth = Sinusoid.curve(amp, phase, grid)
    names = list(learners)
    shown = (0, 1, 10)
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.8 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        learner = learners[name]
        # each learner's own inner rule, as the table adapts (guarded with --test-guard), one task at a time
        fits = {s: [learner.adapt(x[c].to(dtype), y[c].to(dtype), steps=s, guard=cfg.test_guard) for c in range(3)]
                for s in shown}
        path = {s: {key: torch.stack([f[key] for f in fit]) for key in fit[0]} for s, fit in fits.items()}
        for col in range(3):
            ax = axes[row][col]
            ax.plot(grid, truth[col], color="red", label="ground truth")
            for steps, style in zip(shown, (":", "--", "-")):
                params = {key: v[col] for key, v in path[steps].items()}
                with torch.no_grad():
                    pred = learner.output(call(learner.model, params, dict(learner.model.named_buffers()),
                                               grid[:, None].to(dtype)))
                ax.plot(grid, pred[:, 0].double(), style, color="tab:green" if steps else "tab:blue",
                        alpha=0.9, label="pre-update" if steps == 0 else f"{steps} grad step{'s' * (steps > 1)}")
            ax.scatter(x[col, :, 0], y[col, :, 0], marker="^", color="purple", zorder=5, label="used for grad")
            ax.set_title(f"{name}, K={k}: A={amp[col]:.2f}, φ={phase[col]:.2f}")
            ax.set_xlabel("x")
            ax.set_ylabel("y")
            ax.set_ylim(-6, 6)
        axes[row][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Few-shot fits (models meta-trained with K={cfg.k_shot}, α={cfg.inner_lr})")
    fig.tight_layout()
    save_figure(fig, run_dir / "figure2_fits.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(cfg.eval_shots), figsize=(4.5 * len(cfg.eval_shots), 3.8), squeeze=False)
    for ax, shot in zip(axes[0], cfg.eval_shots):
        drawn = False
        for name in names:
            mean, lower, upper, left_out = _log_band(results[name][shot].losses)
            steps = torch.arange(mean.shape[0])
            label = name + (f" ({left_out} of {results[name][shot].losses.shape[0]} tasks non-finite, left out)"
                            if left_out else "")
            ax.plot(steps, mean, marker="o", markersize=3, label=label)
            ax.fill_between(steps, lower, upper, alpha=0.25)
            drawn = drawn or bool((mean > 0).any())
        if drawn:
            ax.set_yscale("log")
        else:  # a log axis with nothing positive and finite on it cannot be drawn at all
            ax.text(0.5, 0.5, "no finite loss to plot", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(f"K={shot} (meta-trained with K={cfg.k_shot})")
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("query mean squared error")
        ax.legend()
    fig.suptitle(f"Learning curves at meta-test time: mean ± 95% CI over {cfg.eval_tasks} tasks")
    fig.tight_layout()
    save_figure(fig, run_dir / "figure3_learning_curve.png")
    plt.close(fig)


def _log_band(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Mean over tasks of ``losses [T, steps]`` and its 95% CI band for a log axis, over the tasks whose
    every loss is finite (a diverged task is left out and counted, not allowed to make the curve NaN):
    ``(mean, lower, upper, tasks left out)``; the lower edge is kept above zero. Points with no finite
    value are NaN, which matplotlib leaves out."""
    losses = losses.double()
    keep = torch.isfinite(losses).all(1)
    kept = losses[keep]
    if kept.shape[0] == 0:
        nan = torch.full((losses.shape[1],), float("nan"), dtype=torch.float64)
        return nan, nan, nan, losses.shape[0]
    mean = kept.mean(0)
    ci = 1.96 * kept.std(0) / kept.shape[0] ** 0.5 if kept.shape[0] > 1 else torch.zeros_like(mean)
    band = [mean, torch.maximum(mean - ci, mean / 10), mean + ci]
    # a sum over huge finite losses can still overflow: such points are left out rather than set the axis to inf
    band = [torch.where(torch.isfinite(v), v, torch.tensor(float("nan"), dtype=v.dtype)) for v in band]
    return *band, int((~keep).sum())


def accuracy_curve(path: Path, table: dict, title: str) -> None:
    """Query accuracy against inner steps, mean ± 95% CI per model (``table[model][step] = {"mean", "ci95"}``,
    as in ``eval.json``): the classification counterpart of Finn et al.'s Fig. 3."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, per_step in table.items():
        steps = [int(k) for k in per_step]
        mean = torch.tensor([100 * per_step[k]["mean"] for k in per_step])
        ci = torch.tensor([100 * (per_step[k]["ci95"] or 0.0) for k in per_step]).nan_to_num(0.0)  # None: one task
        ax.plot(steps, mean, marker="o", markersize=3, label=name)
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.25)
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# The figures a family's report may declare (``Report.figures``): name -> draw(run_dir, learners, results, cfg).
FIGURES = {"sinusoid": sinusoid_figures}
