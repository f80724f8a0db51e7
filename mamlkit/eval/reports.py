"""Final evaluation reports: tables beside the paper's numbers, JSON, and figures.

``report(run_dir, learners, cfg)`` evaluates every learner (MAML, and the pretrained baseline
when there is one) on the same fixed test tasks and writes ``eval.json``, ``eval.md`` and the
family's figures into ``run_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mamlkit.algorithms import MetaLearner
from mamlkit.checkpoint import atomic_write_text
from mamlkit.config import TrainConfig
from mamlkit.eval import plots
from mamlkit.eval.evaluate import EvalResult, evaluate, evaluate_descent, fmt, test_tasks
from mamlkit.presets import PRESETS
from mamlkit.tasks import get_family
from mamlkit.tasks.sinusoid import Sinusoid

BN_MODE_TEXT = {"transductive": "transductive (batch statistics of each query batch, as the paper)",
                "support": "non-transductive (support-set statistics only)"}
EVAL_SEED_OFFSET = 10_000  # evaluation tasks never share a stream with training or validation


def _paper(cfg: TrainConfig) -> dict:
    preset = PRESETS.get(cfg.preset)
    return preset.paper if preset else {}


def sinusoid_protocol(cfg: TrainConfig) -> str:
    """The evaluation protocol of :func:`sinusoid_report`, in words."""
    query = f"{cfg.eval_query} query points" if cfg.eval_query else "K query points (as many as support points)"
    return (f"One model per learner, meta-trained with K={cfg.k_shot}, {cfg.inner_steps} inner step(s) at "
            f"α={cfg.inner_lr}, then fine-tuned on each K below (the paper fine-tunes a single model on every "
            f"K). {cfg.eval_tasks} fixed test tasks per K, {query} each; query MSE, mean ± 95% CI and the "
            f"median. Test-time inner SGD at α={cfg.inner_lr} on the same K points at every step; a step that "
            f"would raise a task's support loss is halved until it does not (plain SGD wherever it descends).")


def sinusoid_report(run_dir: Path, learners: dict[str, MetaLearner], cfg: TrainConfig) -> str:
    """Query MSE after ``cfg.eval_steps`` inner steps for every K in ``cfg.eval_shots`` (Finn et al. Fig. 3).

    Writes ``eval.md`` and ``eval.json`` (strict JSON: a number that is not finite is ``null`` and the
    cell's ``flag`` says why) and the figures. Every cell is checked: a non-finite loss on any task, or
    a 95% CI wider than the mean, flags it."""
    dtype = getattr(torch, cfg.dtype)
    max_steps = max(cfg.eval_steps)
    paper = _paper(cfg)
    results: dict[str, dict[int, EvalResult]] = {name: {} for name in learners}
    for k in cfg.eval_shots:
        tasks = test_tasks(Sinusoid(k_support=k, k_query=cfg.eval_query or k), cfg.seed + EVAL_SEED_OFFSET,
                           cfg.eval_tasks)
        for name, learner in learners.items():
            results[name][k] = evaluate_descent(learner, tasks, max_steps, device=cfg.device, dtype=dtype)
    names = list(learners)
    head = "| K | steps | " + " | ".join(f"{n} MSE (ours)" for n in names) + " | " + \
        " | ".join(f"{n} (paper)" for n in names) + " |"
    lines = [f"Sinusoid regression. {sinusoid_protocol(cfg)}", "", head, "|" + "---|" * (2 + 2 * len(names))]
    table: dict = {}
    for k in cfg.eval_shots:
        for s in cfg.eval_steps:
            theirs = [paper.get(n, {}).get(k, {}).get(s) for n in names]
            lines.append(f"| {k} | {s} | " + " | ".join(results[n][k].loss_text(s) for n in names) + " | " +
                         " | ".join("—" if t is None else f"{t:.2f}" for t in theirs) + " |")
            for n, t in zip(names, theirs):
                table.setdefault(n, {}).setdefault(str(k), {})[str(s)] = {**results[n][k].cell(s), "paper": t}
    halved = {n: {str(k): int(results[n][k].halved.sum()) for k in cfg.eval_shots} for n in names
              if all(results[n][k].halved is not None for k in cfg.eval_shots)}
    if halved:
        lines += ["", "Tasks on which some test-time step was halved: " + "; ".join(
            f"{n} " + ", ".join(f"K={k} {by_k[str(k)]}/{cfg.eval_tasks}" for k in cfg.eval_shots)
            for n, by_k in halved.items()) + "."]
    lines += [f"{n}: its own inner rule, no step halved." for n in names if n not in halved]
    flagged = [f"{n} K={k} after {s}" for n in names for k in cfg.eval_shots for s in cfg.eval_steps
               if table[n][str(k)][str(s)]["flag"]]
    if flagged:
        lines.append("⚠ Flagged cells (their mean is not to be trusted): " + "; ".join(flagged) + ".")
    text = "\n".join(lines) + "\n"
    record = {"task": "sinusoid", "protocol": sinusoid_protocol(cfg), "meta_train_k": cfg.k_shot,
              "inner_lr": cfg.inner_lr, "num_tasks": cfg.eval_tasks, "query_points": cfg.eval_query or "K",
              "mse": table, "halved_tasks": halved}
    atomic_write_text(run_dir / "eval.json", json.dumps(record, indent=2, allow_nan=False))
    atomic_write_text(run_dir / "eval.md", text)
    plots.sinusoid_figures(run_dir, learners, results, cfg)
    return text


def classification_report(run_dir: Path, learners: dict[str, MetaLearner], cfg: TrainConfig) -> str:
    """Query accuracy after each inner step on ``cfg.eval_tasks`` fixed test tasks (± 95% CI)."""
    dist = get_family(cfg.task).build(cfg, "test")
    tasks = test_tasks(dist, cfg.seed + EVAL_SEED_OFFSET, cfg.eval_tasks)
    steps = cfg.eval_inner_steps
    paper = _paper(cfg)
    lines = [f"{cfg.preset or cfg.task}: query accuracy (%), mean ± 95% CI over {cfg.eval_tasks} test tasks, "
             f"{cfg.n_way}-way {cfg.k_shot}-shot, {cfg.k_query} query images per class, α={cfg.inner_lr}.",
             f"Batch norm: {BN_MODE_TEXT.get(cfg.bn_mode, cfg.bn_mode)}.",
             *([f"Omniglot split {cfg.split!r}, rotations {cfg.rotations!r}."]
               if cfg.task == "omniglot" else []),
             *([f"Paper ({PRESETS[cfg.preset].citation}): " + ", ".join(f"{k} {v}" for k, v in paper.items())]
               if paper else []), "",
             "| model | " + " | ".join(f"{s} steps" for s in range(steps + 1)) + " | paper |",
             "|" + "---|" * (steps + 3)]
    table = {}
    for name, learner in learners.items():
        res = evaluate(learner, tasks, steps, batch_size=50, device=cfg.device, dtype=getattr(torch, cfg.dtype))
        accs = [res.acc(s) for s in range(steps + 1)]
        ref = paper.get(name)
        lines.append(f"| {name} | " + " | ".join(fmt(100 * m, 100 * c, 2) for m, c in accs) +
                     f" | {ref if ref is not None else '—'} |")
        table[name] = {str(s): {"mean": m, "ci95": c} for s, (m, c) in enumerate(accs)}
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "eval.json", json.dumps({"task": cfg.task, "accuracy": table,
                                                         "num_tasks": cfg.eval_tasks, "bn_mode": cfg.bn_mode,
                                                         "paper": paper}, indent=2))
    atomic_write_text(run_dir / "eval.md", text)
    return text


def report(run_dir: Path, learners: dict[str, MetaLearner], cfg: TrainConfig) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    kind = next(iter(learners.values())).kind
    if cfg.task == "sinusoid":
        return sinusoid_report(run_dir, learners, cfg)
    if cfg.task in ("csv", "clinc"):  # issue 9: reports with the baselines run in the same evaluation
        import importlib

        module = {"csv": "tabular", "clinc": "text"}[cfg.task]
        return importlib.import_module(f"mamlkit.tasks.{module}").report(run_dir, learners, cfg)
    if kind == "classification":
        return classification_report(run_dir, learners, cfg)
    raise NotImplementedError(f"no report for task family {cfg.task!r}")
