"""Published MAML success rates on Meta-World, printed beside mamlkit's own evaluation (``eval.md``).

They are data, each with its source, where in it the number stands, the reward version it was obtained with
and what it measures. None is comparable with a mamlkit run unless the reward version, the split (meta-train
or meta-test) and the measure agree: Meta-World+ (McLean et al., NeurIPS 2025 Datasets and Benchmarks,
arXiv:2505.11289) showed that results move a lot between the v1 and v2 reward functions, and the Meta-World
paper's Table 1 reports the best success rate seen during training, not one evaluation of a final policy.
``value`` is None where a source only plots the number.
"""

from __future__ import annotations

from dataclasses import dataclass

YU_2019 = "Yu et al., Meta-World, CoRL 2019 (arXiv:1910.10897v1), via Papers with Code's listing of its results"
YU_2021 = "Yu et al., Meta-World, arXiv:1910.10897v2 (2021 revision of the CoRL 2019 paper)"
ATAMURADOV_2025 = "Atamuradov, MAML on MetaWorld ML10, arXiv:2511.12383v1 (2025)"


@dataclass(frozen=True)
class Figure:
    """One published MAML number: ``value`` (a success rate in [0, 1], or None where only plotted),
    the ``split`` it was measured on, the ``reward`` version, and ``measure``: what the number is."""

    source: str
    where: str
    reward: str
    split: str
    value: float | None
    measure: str


_LISTED = "success rate as listed there (measure and seeds not given)"
_BEST = "average over tasks of the maximum success rate during training, 10 seeds"
_ML1_PLOT = ("MAML-TRPO success rate, 10 seeds, drawn as bars: the text gives no number (learning curves: "
             "App. C, Figs. 12-14)")

PUBLISHED: dict[str, tuple[Figure, ...]] = {
    "ml10": (
        Figure(YU_2019, "results table", "v1", "meta-train", 0.25, _LISTED),
        Figure(YU_2019, "results table", "v1", "meta-test", 0.36, _LISTED),
        Figure(YU_2021, "Table 1", "v2", "meta-train", 0.444, _BEST),
        Figure(YU_2021, "Table 1", "v2", "meta-test", 0.316, _BEST + " (Sec. 5's text says 35%)"),
        Figure(ATAMURADOV_2025, "abstract", "not stated", "meta-train", 0.210,
               "final success rate of MAML-TRPO (one-step adaptation)"),
        Figure(ATAMURADOV_2025, "abstract", "not stated", "meta-test", 0.132,
               "final success rate of MAML-TRPO (one-step adaptation), held-out test tasks"),
    ),
    **{f"ml1-{task}": (Figure(YU_2021, "Figure 4", "v2", "meta-train and meta-test", None, _ML1_PLOT),)
       for task in ("reach", "push", "pick-place")},
}


def figures(env: str) -> tuple[Figure, ...]:
    """The published MAML figures for a mamlkit environment name (``ml10``, ``ml1-reach``, ...); empty for the
    other ML1 tasks, for which the Meta-World paper gives no MAML result."""
    return PUBLISHED.get(env, ())


def table(env: str, reward: str) -> list[str]:
    """Markdown lines of :func:`figures` for ``env`` (none when there are none), headed by a caveat that names
    the run's ``reward`` version."""
    rows = figures(env)
    if not rows:
        return []
    lines = [f"Published MAML figures for {env} (success rates; comparable with the table above only where the "
             f"reward version ({reward} here), the split (the table above is the test split) and the measure "
             "agree):", "", "| source | where | reward | split | success rate | measure |", "|---|---|---|---|---|---|"]
    for f in rows:
        value = "plotted only" if f.value is None else f"{100 * f.value:.1f}%"
        lines.append(f"| {f.source} | {f.where} | {f.reward} | {f.split} | {value} | {f.measure} |")
    return lines
