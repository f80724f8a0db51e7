"""The task-family protocol: what a family of tasks supplies to the rest of mamlkit.

A family is one :class:`TaskFamily` value registered under its ``--task`` name
(:func:`mamlkit.tasks.register_task_family`). Everything the trainer, ``mamlkit adapt``,
``mamlkit.load``, ``mamlkit data`` and the evaluation report need to know about it is here, so
adding a family is one file plus a registry line (docs/DEVELOPING.md, "How to add a task family"):

* ``build(cfg, split)``: the task distribution of ``split`` (``"train" | "val" | "test"``);
* ``model_spec(cfg)``: the JSON spec for :func:`mamlkit.models.build_model`;
* ``input_spec(cfg)``: how raw inputs become model inputs (:data:`INPUT_TYPES`), stored with the model;
  ``None``: the family takes tensors only, and ``mamlkit adapt`` refuses it with a clear message;
* ``data``: what ``mamlkit data NAME`` does for it (``None``: no dataset to fetch);
* ``report(cfg)``: a :class:`Report`, the declaration of its evaluation report. ``mamlkit.eval`` writes
  every report from it; a family never writes one. ``None``: the default layout for the learner's kind;
* ``options``: the options classes it reads (:mod:`mamlkit.base.options`), its flags.

Nothing here imports a part above Base: the declarations are data, interpreted by Use and Eval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The raw-input formats mamlkit.use reads (``input_spec(cfg)["type"]``):
#   image  a support folder per class, query files (keys mode "L" | "RGB", size, invert, scale)
#   text   utterances, encoded with the stored encoder recipe
#   table  rows as column -> value, encoded with the stored meta-train encoding (model spec "preprocess")
#   vector a CSV of input columns (then the target, or the label of a classification family), one row per example
# mamlkit/use/formats.py reads each type for the kinds of family that may declare it.
INPUT_TYPES = ("image", "text", "table", "vector")


@dataclass(frozen=True)
class DataCommand:
    """``mamlkit data NAME``: ``prepare(data_root, trust_checksum, download) -> str`` downloads what is
    missing (when ``download``), verifies, builds caches and returns the summary line(s) to print."""

    name: str
    prepare: Callable[[str, bool, bool], str]


@dataclass(frozen=True)
class Column:
    """A column of a ``methods`` report: the query ``"acc"`` (%, 2 digits) or ``"loss"`` (× ``scale``,
    3 digits), mean ± 95% CI."""

    metric: str
    heading: str
    scale: float = 1.0


@dataclass(frozen=True)
class Baseline:
    """A non-meta-learned method run on the same test episodes as the learners.

    ``method``: ``"scratch"``, a fresh model trained on each support set alone (full-batch Adam,
    ``steps`` at ``lr``, from one initialisation drawn from ``cfg.seed + 1``); ``"prototypes"``, the
    nearest support centroid in input space. ``model()`` builds the scratch model (``None``: the
    family's own ``model_spec(cfg)``). ``tasks(cfg, split)`` gives the episodes it sees (``None``:
    the family's ``build``); they must draw the same classes and examples as the learners' episodes.
    """

    name: str     # key in eval.json and in the paired comparisons
    label: str    # the method cell of the table
    method: str   # "scratch" | "prototypes"
    steps: int = 0
    lr: float = 0.0
    model: Callable[[], Any] | None = None
    tasks: Callable[[Any, str], Any] | None = None


@dataclass(frozen=True)
class Report:
    """What a family's evaluation report contains; :mod:`mamlkit.eval.reports` writes it.

    ``table`` picks the layout:

    * ``"steps"`` (classification): a row per learner, query accuracy after 0..K test-time steps,
      the preset's paper numbers beside them;
    * ``"shots"`` (regression): query loss per (K shots in ``cfg.eval_shots``, steps in
      ``cfg.eval_steps``), a column per learner and its paper number; the test tasks of K shots are
      ``build(cfg.replace(k_shot=K, k_query=cfg.eval_query), "test")``;
    * ``"methods"``: a row per (learner, steps in ``steps``, default 0 and the test-time steps) and one
      per baseline, with ``columns``, then paired comparisons on the same episodes after the test-time
      steps (``compare``: ``"all_pairs"``, ``"baselines"``: each learner against each baseline, or
      ``""``: none) of the query loss (``metric="loss"``: "lower than") or accuracy
      (``metric="accuracy"``: "beats").

    ``title`` names the tasks in the opening line of ``steps`` and ``shots`` (default: the preset or the
    task name); ``describe`` lines follow the layout's opening lines (``methods`` has none of its own).
    ``figures`` names figures :mod:`mamlkit.eval.plots` draws. ``facts`` are extra eval.json fields
    (those named in ``facts_first`` go before the results). ``chunk``: test episodes drawn this many at a
    time (memory); ``batch_size``: tasks adapted at once (``None``: the layout's default).
    """

    table: str = "steps"
    title: str = ""
    describe: tuple[str, ...] = ()
    figures: tuple[str, ...] = ()
    metric: str = "accuracy"
    columns: tuple[Column, ...] = ()
    steps: tuple[int, ...] = ()
    adaptation: str = "{steps} SGD steps"
    learner_labels: dict[str, str] = field(default_factory=dict)
    baselines: tuple[Baseline, ...] = ()
    compare: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    facts_first: tuple[str, ...] = ()
    chunk: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class TaskFamily:
    """One family of tasks (module docstring)."""

    name: str
    build: Callable[[Any, str], Any]                # (cfg, split) -> TaskDistribution
    model_spec: Callable[[Any], dict[str, Any]]     # cfg -> spec for mamlkit.models.build_model
    input_spec: Callable[[Any], dict[str, Any]] | None = None  # cfg -> raw-input spec (INPUT_TYPES)
    data: DataCommand | None = None                 # `mamlkit data NAME`
    report: Callable[[Any], Report] | None = None   # cfg -> the declared evaluation report
    # the options classes the family reads (mamlkit.base.options; the built-in ones: mamlkit.tasks.options); a
    # class's ``derived()`` gives generic config values it sets from its options (a CSV task's loss)
    options: tuple[type, ...] = ()


__all__ = ["INPUT_TYPES", "DataCommand", "Column", "Baseline", "Report", "TaskFamily"]
