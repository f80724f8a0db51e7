"""Build the CLINC150 text model and the text and CSV example tasks that ship inside the package.

    python scripts/ship_text_csv.py [CLINC_RUN_DIR]

1. With CLINC_RUN_DIR (a finished ``mamlkit train clinc-5w1s`` run): writes
   ``mamlkit/assets/clinc-5w1s.safetensors``, its meta-parameters, buffers and config without optimiser
   state (the frozen-encoder head is 384×5 + 5 numbers; the encoder comes from the ``text`` extra).
2. ``mamlkit/assets/examples/clinc/``: ``support.csv`` (text,label: 5 new intents, 2 utterances each,
   written for this example, not from CLINC150) and ``query.txt`` (one utterance per line).
3. ``mamlkit/assets/examples/csv/``: a synthetic store-sales table (seeded, so it is rebuilt bit for
   bit): ``stores.csv`` (30 stores × 24 days: ``store,temperature,day,sales``), and a new store's
   ``new_store_support.csv`` (6 days with sales) and ``new_store_query.csv`` (4 days, an ``id``
   column, no sales). Sales = base + slope·temperature + weekend bonus + noise, each store drawing its
   own base, slope and bonus: a task per store, as ``mamlkit train csv --task-column store`` expects.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "mamlkit" / "assets"

SUPPORT = [
    ("book a table for four at seven tonight", "book_table"),
    ("can you reserve a table for two on friday", "book_table"),
    ("i forgot my password and cannot log in", "reset_password"),
    ("how do i change my login password", "reset_password"),
    ("where is my parcel right now", "track_package"),
    ("has my order shipped yet", "track_package"),
    ("stop my monthly subscription", "cancel_subscription"),
    ("i want to cancel my membership", "cancel_subscription"),
    ("the internet is down in my building", "report_outage"),
    ("there's no electricity on my street", "report_outage"),
]
QUERY = [
    "please reserve a table for six at eight",
    "my password doesn't work anymore",
    "when will my package arrive",
    "end my subscription please",
    "our wifi stopped working this morning",
]


def slim_checkpoint(run_dir: Path) -> None:
    from mamlkit import checkpoint

    checkpoint.slim(run_dir, ASSETS / "clinc-5w1s.safetensors")


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def text_example() -> None:
    out = ASSETS / "examples" / "clinc"
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "support.csv", ["text", "label"], [list(r) for r in SUPPORT])
    (out / "query.txt").write_text("\n".join(QUERY) + "\n")


def _store(rng: random.Random) -> tuple[float, float, float]:
    return rng.uniform(80, 200), rng.uniform(-3, 6), rng.uniform(0, 60)  # base, slope per °C, weekend bonus


def _day(rng: random.Random, store: tuple[float, float, float], i: int) -> tuple[float, str, float]:
    base, slope, bonus = store
    temperature = round(rng.uniform(-5, 30), 1)
    day = "weekend" if i % 7 in (5, 6) else "weekday"
    sales = base + slope * temperature + (bonus if day == "weekend" else 0.0) + rng.gauss(0, 5)
    return temperature, day, round(sales, 1)


def csv_example() -> None:
    rng = random.Random(9)
    out = ASSETS / "examples" / "csv"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(30):
        store = _store(rng)
        rows += [[f"store{s:02d}", *_day(rng, store, i)] for i in range(24)]
    _write(out / "stores.csv", ["store", "temperature", "day", "sales"], rows)
    new = _store(rng)
    days = [_day(rng, new, i) for i in range(10)]
    _write(out / "new_store_support.csv", ["temperature", "day", "sales"], [list(d) for d in days[:6]])
    _write(out / "new_store_query.csv", ["id", "temperature", "day"],
           [[f"day{i}", t, d] for i, (t, d, _) in enumerate(days[6:], start=6)])
    print(f"new store: base {new[0]:.1f}, slope {new[1]:.2f}, weekend bonus {new[2]:.1f}; query sales "
          f"{[d[2] for d in days[6:]]}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    args = ap.parse_args()
    if args.run_dir:
        slim_checkpoint(Path(args.run_dir))
    text_example()
    csv_example()


if __name__ == "__main__":
    main()
