"""Plot a run's validation accuracy against wall-clock time from its metrics.jsonl.

    python benchmarks/plot_curve.py RUN_DIR OUT.png

Resumed runs restart their clock: each resumed segment is placed after the previous one.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(run_dir: str, out: str) -> None:
    records = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl")]
    offset, last, clock = 0.0, 0.0, {}
    for r in records:
        if r["split"] == "train":
            if r["elapsed_s"] < last:  # a resumed segment starts its clock at zero
                offset += last
            last = r["elapsed_s"]
            clock[r["step"]] = offset + r["elapsed_s"]
    points = [(clock[r["step"]] / 60, 100 * r["acc"]) for r in records if r["split"] == "val" and r["step"] in clock]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(*zip(*points), marker="o")
    ax.axhline(97, color="gray", ls="--", label="97% target")
    ax.set_xlabel("wall-clock minutes (2-core CPU)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(run_dir.rstrip("/").split("/")[-1])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    for minutes, acc in points:
        print(f"{minutes:7.1f} min  {acc:5.1f}%")


if __name__ == "__main__":
    main(*sys.argv[1:3])
