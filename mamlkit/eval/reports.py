"""Final evaluation reports: tables beside the paper's numbers, JSON, and figures.

``report(run_dir, learners, cfg)`` evaluates every learner (MAML, and the pretrained baseline
when there is one) on the same fixed test tasks and writes ``eval.json``, ``eval.md`` and the
family's figures into ``run_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mamlkit.algorithms import MetaLearner
from mamlkit.base.batch import TaskBatch, task_generator
from mamlkit.base.metrics import mean_ci
from mamlkit.checkpoint import atomic_write_text
from mamlkit.config import TrainConfig
from mamlkit.eval import baselines, plots
from mamlkit.eval.evaluate import ACC_LEGEND, CELL_LEGEND, EvalResult, evaluate, fmt, test_tasks
from mamlkit.models import build_model
from mamlkit.presets import PRESETS
from mamlkit.runfolder import register_run_files
from mamlkit.tasks import Baseline, Column, Report, get_family

BN_MODE_TEXT = {"transductive": "transductive (batch statistics of each query batch, as the paper)",
                "support": "non-transductive (support-set statistics only)"}
EVAL_SEED_OFFSET = 10_000  # evaluation tasks never share a stream with training or validation
# Every file a report may write into its folder (`mamlkit eval` refuses to replace them unless asked).
REPORT_FILES = ("eval.md", "eval.json", "figure2_fits.png", "figure3_learning_curve.png", "accuracy_curve.png")
register_run_files(*REPORT_FILES)  # a run's manifest may name them; --overwrite removes them


def _paper(cfg: TrainConfig) -> dict:
    """The preset's paper numbers, when the run is on the preset's own task (a new family trained from
    another family's preset settings has none)."""
    preset = PRESETS.get(cfg.preset)
    if preset is None or preset.overrides.get("task", TrainConfig().task) != cfg.task:
        return {}
    return preset.paper


def adaptation_text(learners: dict[str, MetaLearner], cfg: TrainConfig) -> str:
    """How the test tasks are adapted, in words, from each learner's own :meth:`describe` (``cfg.test_guard``:
    within the descent safeguard, the guarded table)."""
    rules = "; ".join(f"{name}: {learner.describe(guard=cfg.test_guard)}" for name, learner in learners.items())
    if cfg.test_guard:
        return (f"Test-time adaptation, guarded (--test-guard): each learner's own inner rule, a step that would raise "
                f"a task's support loss halved until it does not ({rules}).")
    return (f"Test-time adaptation: the paper's protocol, each learner's own inner rule, no step halved ({rules}); "
            f"`--test-guard` gives the guarded table.")


def shots_protocol(cfg: TrainConfig, learners: dict[str, MetaLearner]) -> str:
    """The evaluation protocol of :func:`shots_report`, in words."""
    query = f"{cfg.eval_query} query points" if cfg.eval_query else "K query points (as many as support points)"
    return (f"One model per learner, meta-trained with K={cfg.k_shot}, {cfg.inner_steps} inner step(s) at "
            f"α={cfg.inner_lr}, then fine-tuned on each K below. {cfg.eval_tasks} fixed test tasks per K, {query} "
            f"each; query MSE. {adaptation_text(learners, cfg)}")


def shots_report(run_dir: Path, learners: dict[str, MetaLearner], cfg: TrainConfig, decl: Report) -> str:
    """Query MSE after ``cfg.eval_steps`` inner steps for every K in ``cfg.eval_shots`` (Finn et al. Fig. 3).

    Every cell is checked: a non-finite loss on any task, or a 95% CI wider than the mean, flags it (in
    eval.md and in the cell's ``flag`` in eval.json, where a number that is not finite is ``null``)."""
    dtype = getattr(torch, cfg.dtype)
    max_steps = max(cfg.eval_steps)
    paper = _paper(cfg)
    family = get_family(cfg.task)
    results: dict[str, dict[int, EvalResult]] = {name: {} for name in learners}
    for k in cfg.eval_shots:
        dist = family.build(cfg.replace(k_shot=k, k_query=cfg.eval_query or k), "test")
        tasks = test_tasks(dist, cfg.seed + EVAL_SEED_OFFSET, cfg.eval_tasks)
        for name, learner in learners.items():
            results[name][k] = evaluate(learner, tasks, max_steps, device=cfg.device, dtype=dtype,
                                        guard=cfg.test_guard)
    names = list(learners)
    head = "| K | steps | " + " | ".join(f"{n} MSE (ours)" for n in names) + " | " + \
        " | ".join(f"{n} (paper)" for n in names) + " |"
    protocol = shots_protocol(cfg, learners)
    lines = [f"{decl.title or cfg.preset or cfg.task}: query MSE. {protocol}", CELL_LEGEND, *decl.describe, "", head,
             "|" + "---|" * (2 + 2 * len(names))]
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
    flagged = [f"{n} K={k} after {s}" for n in names for k in cfg.eval_shots for s in cfg.eval_steps
               if table[n][str(k)][str(s)]["flag"]]
    if flagged:
        lines.append("⚠ Flagged cells (their mean is not to be trusted): " + "; ".join(flagged) + ".")
    text = "\n".join(lines) + "\n"
    facts = {"protocol": protocol, "meta_train_k": cfg.k_shot, "inner_lr": cfg.inner_lr,
             "query_points": cfg.eval_query or "K", "test_guard": cfg.test_guard,
             "inner_rules": {n: learner.describe(guard=cfg.test_guard) for n, learner in learners.items()},
             **({"halved_tasks": halved} if cfg.test_guard else {})}
    _write(run_dir, text, cfg, dataclasses.replace(decl, facts={**facts, **decl.facts},
                                                   facts_first=("protocol", "meta_train_k", "inner_lr")),
           "mse", table)
    for figure in decl.figures:
        plots.FIGURES[figure](run_dir, learners, results, cfg)
    return text


def steps_report(run_dir: Path, learners: dict[str, MetaLearner], cfg: TrainConfig, decl: Report) -> str:
    """Query accuracy after each inner step on ``cfg.eval_tasks`` fixed test tasks (± 95% CI)."""
    dist = get_family(cfg.task).build(cfg, "test")
    tasks = test_tasks(dist, cfg.seed + EVAL_SEED_OFFSET, cfg.eval_tasks)
    steps = cfg.eval_inner_steps
    paper = _paper(cfg)
    lines = [f"{decl.title or cfg.preset or cfg.task}: query accuracy (%), mean ± 95% CI over {cfg.eval_tasks} "
             f"test tasks, {cfg.n_way}-way {cfg.k_shot}-shot, {cfg.k_query} query images per class, "
             f"α={cfg.inner_lr}.", adaptation_text(learners, cfg), ACC_LEGEND,
             f"Batch norm: {BN_MODE_TEXT.get(cfg.bn_mode, cfg.bn_mode)}.", *decl.describe,
             *([f"Paper ({PRESETS[cfg.preset].citation}): " + ", ".join(f"{k} {v}" for k, v in paper.items())]
               if paper else []), "",
             "| model | " + " | ".join(f"{s} steps" for s in range(steps + 1)) + " | paper |",
             "|" + "---|" * (steps + 3)]
    table = {}
    for name, learner in learners.items():
        res = evaluate(learner, tasks, steps, batch_size=decl.batch_size or 50, device=cfg.device,
                       dtype=getattr(torch, cfg.dtype), guard=cfg.test_guard)
        ref = paper.get(name)
        lines.append(f"| {name} | " + " | ".join(res.acc_text(s) for s in range(steps + 1)) +
                     f" | {ref if ref is not None else '—'} |")
        table[name] = {str(s): res.acc_cell(s) for s in range(steps + 1)}
    text = "\n".join(lines) + "\n"
    _write(run_dir, text, cfg, dataclasses.replace(decl, facts={"bn_mode": cfg.bn_mode, "paper": paper, **decl.facts}),
           "accuracy", table)
    plots.accuracy_curve(run_dir / "accuracy_curve.png", table, f"{cfg.preset or cfg.task}: {cfg.n_way}-way "
                         f"{cfg.k_shot}-shot, {cfg.eval_tasks} test tasks")
    return text


def methods_report(run_dir: Path, learners: dict[str, MetaLearner], cfg: TrainConfig, decl: Report) -> str:
    """The learners at ``decl.steps`` and the declared baselines on the same fixed test episodes, then
    paired comparisons after the test-time steps: a difference counts only when its 95% CI excludes 0."""
    family = get_family(cfg.task)
    seed, n, K = cfg.seed + EVAL_SEED_OFFSET, cfg.eval_tasks, cfg.eval_inner_steps
    dtype = getattr(torch, cfg.dtype)
    dist = family.build(cfg, "test")
    episodes: dict[Any, TaskBatch] = {}  # the baselines' episodes, one set per distinct builder
    for b in decl.baselines:
        if b.tasks is not None and b.tasks not in episodes:
            episodes[b.tasks] = test_tasks(b.tasks(cfg, "test"), seed, n)
    chunk = decl.chunk or n
    steps = decl.steps or tuple(sorted({0, K}))
    losses: dict[str, list[Tensor]] = {name: [] for name in learners}
    accs: dict[str, list[Tensor]] = {name: [] for name in learners}
    for start in range(0, n, chunk):
        tasks = TaskBatch.cat([dist.sample(1, task_generator(seed, "test", k))
                               for k in range(start, min(n, start + chunk))])
        if decl.chunk is None:
            episodes.setdefault(None, tasks)
        for name, learner in learners.items():
            res = evaluate(learner, tasks, max(*steps, K), batch_size=decl.batch_size or 100, device=cfg.device,
                           dtype=dtype, guard=cfg.test_guard)
            losses[name].append(res.losses)
            accs[name].append(res.accs)
    by_acc = decl.metric == "accuracy"
    lines = [*decl.describe, adaptation_text(learners, cfg), "Each cell: mean ± 95% CI over the test episodes, then "
             "the median; ⚠ where some episode's value is not finite.", "",
             "| method | adaptation | " + " | ".join(c.heading for c in decl.columns) + " |",
             "|" + "---|" * (2 + len(decl.columns))]
    table: dict = {}
    final: dict[str, Tensor] = {}  # per task, after the test-time steps: what the comparisons pair
    for name, learner in learners.items():
        res = EvalResult(torch.cat(losses[name]), torch.cat(accs[name]))
        final[name] = (res.accs if by_acc else res.losses)[:, K]
        for s in steps:
            cells = _cells(decl.columns, res.losses[:, s], res.accs[:, s])
            lines.append(f"| {decl.learner_labels.get(name, name)} | {decl.adaptation.format(steps=s)} | {cells} |")
            table.setdefault(name, {})[str(s)] = _entry(decl, res.losses[:, s], res.accs[:, s],
                                                        learner.kind == "classification")
    for b in decl.baselines:
        if b.tasks not in episodes:  # the family's own episodes, drawn in chunks above: all of them now
            episodes[b.tasks] = test_tasks(dist, seed, n)
        loss, acc = _baseline(b, episodes[b.tasks].to(cfg.device, dtype), cfg, family, dtype)
        final[b.name] = acc if by_acc else loss
        how = f"{b.steps} Adam steps, lr {b.lr}" if b.method == "scratch" else "none"
        lines.append(f"| {b.label} | {how} | {_cells(decl.columns, loss, acc)} |")
        entry = _entry(decl, loss, acc, cfg.loss == "cross_entropy")
        table[b.name] = entry if by_acc else {str(b.steps): entry}
    lines.append("")
    names = list(final)
    pairs = {"all_pairs": [(a, o) for i, a in enumerate(names[:-1]) for o in names[i + 1:]],
             "baselines": [(a, b.name) for a in learners for b in decl.baselines], "": []}[decl.compare]
    for a, o in pairs:
        m, c = mean_ci(final[a] - final[o])
        if by_acc:  # a gain in accuracy
            verdict = "beats" if m - c > 0 else ("loses to" if m + c < 0 else "ties with (CI of the gain spans 0)")
            lines.append(f"{a} after {K} steps {verdict} {o}: paired gain {fmt(100 * m, 100 * c, 2)} points.")
            table[a][f"gain_vs_{o}"] = {"mean": m, "ci95": c}
        else:  # a difference in loss
            verdict = "lower than" if m + c < 0 else ("higher than" if m - c > 0 else "not different from")
            lines.append(f"{a} after {K} steps: query loss {verdict} {o}'s (paired difference {fmt(m, c)}).")
            table[a][f"diff_vs_{o}"] = {"mean": m, "ci95": c}
    text = "\n".join(lines) + "\n"
    _write(run_dir, text, cfg, decl, "accuracy" if by_acc else "loss", table)
    return text


def _stat(values: Tensor, scale: float, digits: int) -> str:
    """``mean ± ci (median m)`` of ``values [T]`` times ``scale``, with ⚠ and the count where some task's value
    is not finite (the mean and CI are then not to be trusted)."""
    m, c = mean_ci(values)
    text = f"{fmt(m * scale, c * scale, digits)} (median {values.double().median().item() * scale:.{digits}f})"
    bad = int((~torch.isfinite(values)).sum())
    return text + (f" ⚠ not finite on {bad}/{len(values)} tasks" if bad else "")


def _cells(columns: tuple[Column, ...], loss: Tensor | None, acc: Tensor) -> str:
    out = []
    for col in columns:
        if col.metric == "acc":
            out.append(_stat(acc, 100, 2))
        else:
            if loss is None:
                raise ValueError(f"column {col.heading!r} shows a loss; this method has none (prototypes)")
            out.append(_stat(loss, col.scale, 3))
    return " | ".join(out)


def _entry(decl: Report, loss: Tensor | None, acc: Tensor, classification: bool) -> dict:
    """A method's eval.json entry: accuracy mean, CI and median, or loss, CI and median (with the accuracy for
    classification)."""
    if decl.metric == "accuracy":
        m, c = mean_ci(acc)
        return {"mean": m, "ci95": c, "median": acc.double().median().item()}
    m, c = mean_ci(loss)
    return {"loss": m, "ci95": c, "median": loss.double().median().item(),
            **({"acc": mean_ci(acc)[0]} if classification else {})}


def _baseline(b: Baseline, tasks: TaskBatch, cfg: TrainConfig, family, dtype: torch.dtype
              ) -> tuple[Tensor | None, Tensor]:
    """Per-task query ``(loss or None, accuracy)`` ``[T]`` of a declared baseline."""
    if b.method == "prototypes":
        return None, baselines.prototype_accuracy(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y,
                                                  cfg.n_way)
    if b.method != "scratch":
        raise ValueError(f"unknown baseline method {b.method!r}; mamlkit.eval runs scratch and prototypes")
    model = (b.model() if b.model is not None else build_model(family.model_spec(cfg))).to(dtype)
    return baselines.scratch_losses(model, cfg.loss, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y,
                                    steps=b.steps, lr=b.lr, seed=cfg.seed + 1)


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite as ``None``: eval.json is strict JSON (a cell's ``flag``
    says why a number is missing; a 95% CI over one task is undefined)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write(run_dir: Path, text: str, cfg: TrainConfig, decl: Report, key: str, table: dict) -> None:
    """``eval.json`` (the task, the facts named first, the results, the number of tasks, the other facts) and
    ``eval.md``, atomically."""
    first = {k: decl.facts[k] for k in decl.facts_first}
    rest = {k: v for k, v in decl.facts.items() if k not in first}
    record = _finite({"task": cfg.task, **first, key: table, "num_tasks": cfg.eval_tasks, **rest})
    atomic_write_text(run_dir / "eval.json", json.dumps(record, indent=2, allow_nan=False))
    atomic_write_text(run_dir / "eval.md", text)


LAYOUTS = {"shots": shots_report, "steps": steps_report, "methods": methods_report}


def declared(cfg: TrainConfig, kind: str) -> Report:
    """The report ``cfg``'s family declares, or the default for the learners' kind: accuracy per step
    (classification), loss per shot and step (regression)."""
    family = get_family(cfg.task)
    if family.report is not None:
        return family.report(cfg)
    return Report(table="steps" if kind == "classification" else "shots")


def _checked(cfg: TrainConfig, kind: str) -> Report:
    """:func:`declared`, refused (a family's mistake) if this module cannot write it."""
    decl = declared(cfg, kind)
    if decl.table not in LAYOUTS:
        raise ValueError(f"task family {cfg.task!r} declares a {decl.table!r} report; layouts: {', '.join(LAYOUTS)}")
    unknown = [f for f in decl.figures if f not in plots.FIGURES] if decl.table == "shots" else []
    unknown += [b.method for b in decl.baselines if b.method not in ("scratch", "prototypes")]
    if unknown:
        raise ValueError(f"task family {cfg.task!r} declares {', '.join(map(repr, unknown))}, which mamlkit.eval "
                         f"cannot draw or run (figures: {', '.join(plots.FIGURES)}; baselines: scratch, prototypes)")
    if any(b.method == "prototypes" for b in decl.baselines) and any(c.metric != "acc" for c in decl.columns):
        raise ValueError(f"task family {cfg.task!r} declares a loss column and a prototypes baseline, which has none")
    return decl


def check(cfg: TrainConfig, kind: str) -> None:
    """What :func:`report` needs of ``cfg`` for learners of ``kind``, checked before training so that a run that
    cannot be reported fails before its first step: the family's declaration, and one task of every test
    distribution the report draws (each K of a ``shots`` report, each declared baseline's episodes)."""
    decl = _checked(cfg, kind)
    family = get_family(cfg.task)
    if decl.table == "shots":
        dists = [family.build(cfg.replace(k_shot=k, k_query=cfg.eval_query or k), "test") for k in cfg.eval_shots]
    else:
        dists = [family.build(cfg, "test")]
    dists += [b.tasks(cfg, "test") for b in decl.baselines if b.tasks is not None]
    for dist in dists:
        dist.sample(1, task_generator(cfg.seed + EVAL_SEED_OFFSET, "test", 0))


def _budgets(iterations: dict[str, int]) -> str:
    """The meta-training iterations of each learner, in words, with a warning when they differ."""
    text = "Meta-training iterations: " + ", ".join(f"{n} {i}" for n, i in iterations.items()) + "."
    if len(set(iterations.values())) > 1:
        text += " ⚠ The learners trained for different numbers of iterations: not a comparison at the same budget."
    return text


def report(run_dir: Path, learners: dict[str, MetaLearner], cfg: TrainConfig,
           iterations: dict[str, int] | None = None) -> str:
    """Evaluate every learner on the family's fixed test tasks and write its declared report into ``run_dir``
    (``eval.md``, ``eval.json``, figures). ``iterations``: how long each learner (by name) meta-trained, stated
    in eval.md and eval.json. Returns the text of ``eval.md``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    decl = _checked(cfg, next(iter(learners.values())).kind)
    if iterations:
        decl = dataclasses.replace(decl, describe=(*decl.describe, _budgets(iterations)),
                                   facts={**decl.facts, "iterations": iterations})
    return LAYOUTS[decl.table](run_dir, learners, cfg, decl)
