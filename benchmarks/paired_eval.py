"""Two policies' Meta-World evaluations compared goal by goal, on one training seed or pooled over several.

    python benchmarks/paired_eval.py MAML_EVAL/eval.json PRETRAIN_EVAL/eval.json
    python benchmarks/paired_eval.py MAML_S0/eval.json PRE_S0/eval.json MAML_S1/eval.json PRE_S1/eval.json

Each pair of files is two ``mamlkit rl eval`` reports of the same benchmark and seed, so every step count ran on
the same test goals (``test_goals``, their indices in the seed's test split). Per step count: each policy's
success rate, the mean ± 95% CI of the per-goal difference (a paired interval: the goals' own difficulty
cancels), the goals on which one policy did better than the other, and the two-sided sign test's p-value over
those goals. With several pairs (one per training seed), each pair is matched within itself and the rows are
given per pair and then pooled over all (seed, goal) differences; the pooled interval treats them as
independent, so it is narrower than an interval over seeds would be.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from mamlkit.base.metrics import mean_ci


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven when each goal is a fair coin."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def differences(a: dict, b: dict) -> dict[int, tuple[float, float, list[float]]]:
    """Per step count present in both reports: ``(success of a, success of b, per-goal differences a - b)``,
    the goals matched by their index in the test split."""
    if (a.get("env"), a.get("environment")) != (b.get("env"), b.get("environment")):
        raise SystemExit("the two reports are not of the same benchmark, package and reward version")
    if a.get("seed", b.get("seed")) != b.get("seed", a.get("seed")):
        raise SystemExit(f"the two reports are of benchmark seeds {a['seed']} and {b['seed']}: their test goals "
                         "differ; pair each policy with the other's run of the same seed")
    out = {}
    for k in sorted(set(a["steps"]) & set(b["steps"]), key=int):
        ra, rb = a["steps"][k], b["steps"][k]
        if "goal_successes" not in ra or "goal_successes" not in rb:
            raise SystemExit("a report has no per-goal success rates: run `mamlkit rl eval` again to write them")
        sa, sb = dict(zip(ra["test_goals"], ra["goal_successes"])), dict(zip(rb["test_goals"], rb["goal_successes"]))
        if set(sa) != set(sb):
            raise SystemExit(f"after {k} step(s) the two reports ran on different test goals")
        out[int(k)] = (ra["success_rate"]["mean"], rb["success_rate"]["mean"], [sa[g] - sb[g] for g in sorted(sa)])
    return out


def summary(steps: int, a: float, b: float, diff: list[float]) -> dict:
    """The paired comparison of one step count from its per-goal differences."""
    d, ci = mean_ci(torch.tensor(diff, dtype=torch.float64))
    wins, losses = sum(x > 0 for x in diff), sum(x < 0 for x in diff)
    return {"steps": steps, "goals": len(diff), "a": a, "b": b, "difference": d, "ci95": ci, "a_better": wins,
            "b_better": losses, "sign_test_p": sign_test(wins, losses)}


def paired(a: dict, b: dict) -> list[dict]:
    """Per step count present in both reports: the paired comparison of ``a`` against ``b``."""
    return [summary(k, sa, sb, diff) for k, (sa, sb, diff) in differences(a, b).items()]


def pooled(pairs: list[tuple[dict, dict]]) -> list[dict]:
    """Per step count present in every pair: the comparison over all (pair, goal) differences, each pair
    matched within itself; ``a`` and ``b`` are the success rates over all goals of all pairs."""
    per_pair = [differences(a, b) for a, b in pairs]
    rows = []
    for k in sorted(set.intersection(*(set(d) for d in per_pair))):
        diff = [x for d in per_pair for x in d[k][2]]
        n = [len(d[k][2]) for d in per_pair]
        a = sum(d[k][0] * m for d, m in zip(per_pair, n)) / sum(n)
        b = sum(d[k][1] * m for d, m in zip(per_pair, n)) / sum(n)
        rows.append(summary(k, a, b, diff))
    return rows


def _table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| steps | goals | success, first | success, second | difference (paired 95% CI) "
          "| goals first better / second better | sign test p |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['goals']} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} ± "
              f"{r['ci95']:.3f} | {r['a_better']} / {r['b_better']} | {r['sign_test_p']:.3g} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", type=Path, nargs="+", metavar="A B",
                    help="eval.json of the first policy, then of the second, for each seed in turn")
    args = ap.parse_args(argv)
    if len(args.reports) % 2 or len(args.reports) > 200:
        ap.error("give the reports in pairs (first policy, second policy), at most 100 pairs")
    docs = [json.loads(p.read_text()) for p in args.reports]
    pairs = list(zip(docs[::2], docs[1::2]))
    for (a, b), first, second in zip(pairs, args.reports[::2], args.reports[1::2]):
        _table(f"{first.parent.name} against {second.parent.name}", paired(a, b))
    if len(pairs) > 1:
        _table(f"pooled over the {len(pairs)} pairs", pooled(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
