"""Two policies' Meta-World evaluations compared goal by goal.

    python benchmarks/paired_eval.py MAML_EVAL/eval.json PRETRAIN_EVAL/eval.json

Both files are ``mamlkit rl eval`` reports of the same benchmark and seed, so every step count ran on the same
test goals (``test_goals``, their indices in the test split). Per step count: each policy's success rate, the
mean ± 95% CI of the per-goal difference (a paired interval: the goals' own difficulty cancels), the goals on
which one policy did better than the other, and the two-sided sign test's p-value over those goals.
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


def paired(a: dict, b: dict) -> list[dict]:
    """Per step count present in both reports: the paired comparison of ``a`` against ``b``."""
    if (a.get("env"), a.get("environment")) != (b.get("env"), b.get("environment")):
        raise SystemExit("the two reports are not of the same benchmark, package and reward version")
    rows = []
    for k in sorted(set(a["steps"]) & set(b["steps"]), key=int):
        ra, rb = a["steps"][k], b["steps"][k]
        if "goal_successes" not in ra or "goal_successes" not in rb:
            raise SystemExit("a report has no per-goal success rates: run `mamlkit rl eval` again to write them")
        sa, sb = dict(zip(ra["test_goals"], ra["goal_successes"])), dict(zip(rb["test_goals"], rb["goal_successes"]))
        if set(sa) != set(sb):
            raise SystemExit(f"after {k} step(s) the two reports ran on different test goals")
        diff = [sa[g] - sb[g] for g in sorted(sa)]
        d, ci = mean_ci(torch.tensor(diff, dtype=torch.float64))
        wins, losses = sum(x > 0 for x in diff), sum(x < 0 for x in diff)
        rows.append({"steps": int(k), "goals": len(diff), "a": ra["success_rate"]["mean"],
                     "b": rb["success_rate"]["mean"], "difference": d, "ci95": ci, "a_better": wins,
                     "b_better": losses, "sign_test_p": sign_test(wins, losses)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="eval.json of the first policy")
    ap.add_argument("b", type=Path, help="eval.json of the second policy")
    args = ap.parse_args(argv)
    a, b = (json.loads(p.read_text()) for p in (args.a, args.b))
    print("| steps | goals | success, first | success, second | difference (paired 95% CI) "
          "| goals first better / second better | sign test p |")
    print("|---|---|---|---|---|---|---|")
    for r in paired(a, b):
        print(f"| {r['steps']} | {r['goals']} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} ± "
              f"{r['ci95']:.3f} | {r['a_better']} / {r['b_better']} | {r['sign_test_p']:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
