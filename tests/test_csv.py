
"""Tasks from a CSV: task-level splits, meta-train-only standardisation (stored in the
checkpoint), episodes within a task, every bad input with exit 2, and a short end-to-end CLI run.

All data are small synthetic CSVs written to a temporary folder, so every number is known.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re

import numpy as np
import pytest
import torch
from helpers import write_csv

from mamlkit import checkpoint
from mamlkit.base.errors import UserError
from mamlkit.data import tables
from mamlkit.data.tables import MISSING
from mamlkit.data.tables import number as _number
from mamlkit.presets import preset_config
from mamlkit.tasks import tabular, task_generator
from mamlkit.tasks.tabular import CSVTasks, load_csv, split_tasks

torch.set_num_threads(1)


def linear_tasks(path, num_tasks=20, rows=16, shuffle=False, seed=0):
    """Task t: y = a_t·x + b_t (a_t = t/10, b_t = t), feature ``tid`` = t and ``rid`` = the row's line
    number, so episodes can be traced back to tasks and rows. Returns the path."""
    rng = random.Random(seed)
    data = []
    for t in range(num_tasks):
        for _ in range(rows):
            x = rng.uniform(-1, 1)
            data.append([f"task{t:02d}", f"{x:.6f}", t, 0, f"{t / 10 * x + t:.6f}"])
    if shuffle:
        rng.shuffle(data)
    for i, r in enumerate(data):
        r[3] = i + 2
    return write_csv(path, ["site", "x", "tid", "rid", "y"], data)


def cfg_for(path, **kw):
    base = dict(path=str(path), task_column="site", target="y", out_dir=str(path.parent / "runs"),
                progress=False, tensorboard=False)
    return preset_config("csv", {**base, **kw})


# --------------------------------------------------------------------------------------
# Splitting, standardisation and episodes


def test_split_by_task_is_disjoint_and_independent_of_row_order(tmp_path):
    a = load_csv(linear_tasks(tmp_path / "a.csv"), "site", "y", min_rows=15)
    b = load_csv(linear_tasks(tmp_path / "b.csv", shuffle=True), "site", "y", min_rows=15)
    assert a.split_values == b.split_values
    sets = [set(v) for v in a.split_values.values()]
    assert sum(map(len, sets)) == 20 and len(set.union(*sets)) == 20  # every task in exactly one split
    assert [len(v) for v in a.split_values.values()] == [14, 3, 3]      # round(0.7·20), round(0.15·20), rest
    # Rows follow their task: every row of a split's task carries that task's id.
    tid = a.x[:, a.feature_names.index("tid")]
    for split, ids in a.splits.items():
        rows = torch.isin(a.task, torch.tensor(ids))
        names = {a.tasks[i] for i in a.task[rows].tolist()}
        assert names == set(a.split_values[split])
        assert set(tid[rows].long().tolist()) == {int(n[4:]) for n in names}


def test_standardisation_uses_meta_train_rows_only(tmp_path):
    d = load_csv(linear_tasks(tmp_path / "a.csv"), "site", "y", min_rows=15)
    train = torch.isin(d.task, torch.tensor(d.splits["train"]))
    torch.testing.assert_close(d.mean, d.x[train].mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.std, d.x[train].std(0, unbiased=False), rtol=0, atol=1e-12)
    assert d.target_mean == pytest.approx(d.y[train].mean().item(), abs=1e-12)
    # The tid feature's mean over train tasks differs from its mean over all rows (0..19 → 9.5).
    train_tids = sorted(int(v[4:]) for v in d.split_values["train"])
    assert d.mean[d.feature_names.index("tid")].item() == pytest.approx(sum(train_tids) / len(train_tids))
    assert d.mean[d.feature_names.index("tid")].item() != pytest.approx(9.5)


def test_episodes_stay_within_one_task_and_never_share_rows(tmp_path):
    d = load_csv(linear_tasks(tmp_path / "a.csv"), "site", "y", min_rows=10)
    tasks = CSVTasks(d, "val", k_shot=4, k_query=6)
    b = tasks.sample(50, task_generator(0, "val", 0))
    assert b.support_x.shape == (50, 4, 3) and b.query_y.shape == (50, 6, 1)
    x = torch.cat([b.support_x, b.query_x], 1)
    tid, rid = x[..., 1], x[..., 2]
    val_tids = {int(v[4:]) for v in d.split_values["val"]}
    assert (tid == tid[:, :1]).all() and set(tid[:, 0].long().tolist()) <= val_tids
    assert all(len(set(r.tolist())) == 10 for r in rid)                # 10 distinct rows per episode
    # Targets are the task's own, standardised with the meta-train statistics.
    y = torch.cat([b.support_y, b.query_y], 1)[..., 0] * d.target_std + d.target_mean
    torch.testing.assert_close(y, tid / 10 * x[..., 0] + tid, atol=1e-4, rtol=0)
    again = tasks.sample(50, task_generator(0, "val", 0))
    assert torch.equal(again.support_x, b.support_x) and torch.equal(again.query_y, b.query_y)


def test_categorical_one_hot_from_meta_train_and_cap(tmp_path):
    rows = [[f"t{t}", ["red", "green", "blue"][(t + i) % 3], i, i % 2] for t in range(10) for i in range(6)]
    path = write_csv(tmp_path / "c.csv", ["site", "colour", "n", "y"], rows)
    d = load_csv(path, "site", "y", kind="classification", min_rows=2)
    assert d.feature_names == ("colour=blue", "colour=green", "colour=red", "n")
    assert d.classes == ("0", "1") and d.y.dtype == torch.long
    assert torch.equal(d.x[:, :3].sum(1), torch.ones(60, dtype=torch.float64))
    assert d.x[0, 2] == 1 and d.x[1, 1] == 1  # t0 row 0 is red, row 1 green
    with pytest.raises(UserError, match=r"column 'colour' is categorical with 3 categories.*cap of 2"):
        load_csv(path, "site", "y", kind="classification", max_categories=2, min_rows=2)


def test_fill_mean_uses_meta_train_mean_and_drop_counts_rows(tmp_path):
    rows = [[f"t{t}", float(t), float(t + i)] for t in range(10) for i in range(6)]
    rows[7][1] = ""            # t1, line 9
    rows[30][1] = "NA"         # t5, line 32
    path = write_csv(tmp_path / "m.csv", ["site", "x", "y"], rows)
    d = load_csv(path, "site", "y", fill="mean", min_rows=2)
    train = set(d.split_values["train"])
    present = [r[1] for r in rows if r[0] in train and r[1] not in ("", "NA")]
    assert d.x[7, 0].item() == pytest.approx(sum(present) / len(present))
    assert d.x[30, 0].item() == pytest.approx(sum(present) / len(present))
    dropped = load_csv(path, "site", "y", fill="drop", min_rows=2)
    assert dropped.dropped_rows == 2 and dropped.x.shape[0] == 58


def test_small_tasks_skipped_with_count_or_refused(tmp_path):
    rows = [[f"t{t}", i, i] for t in range(20) for i in range(3 if t < 5 else 10)]
    path = write_csv(tmp_path / "s.csv", ["site", "x", "y"], rows)
    d = load_csv(path, "site", "y", min_rows=5)
    small = {f"t{t}" for t in range(5)}
    assert sum(d.skipped.values()) == 5
    assert {s: sum(v in small for v in vs) for s, vs in d.split_values.items()} == d.skipped
    assert sum(map(len, d.splits.values())) == 15
    with pytest.raises(UserError, match="fewer than 5 rows"):
        load_csv(path, "site", "y", min_rows=5, small_tasks="error")


def test_split_tasks_needs_a_task_per_split():
    assert split_tasks(["a", "b", "c"], (0.34, 0.33, 0.33)) == split_tasks(["c", "b", "a"], (0.34, 0.33, 0.33))
    with pytest.raises(UserError, match="leaves no task for"):
        split_tasks(["a", "b"], (0.7, 0.15, 0.15))


# --------------------------------------------------------------------------------------
# Streaming: the file is read in batches, twice. The encoding is the module docstring's rules, whatever the
# batch size and whichever reader (columnar, or rows when an error must name lines).


def reference_encoding(path, task_column, target, features=(), kind="regression", fill="none", min_rows=1,
                       task_split=(0.7, 0.15, 0.15)):
    """The encoding of a valid file by the module docstring's rules, plainly over Python rows: ``(x, y, task,
    feature names, categories, classes, values, splits, mean, std, target mean, target std)``."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [c.strip() for c in rows[0]]
    body = [[v.strip() for v in r] for r in rows[1:] if any(v.strip() for v in r)]
    feats = list(features) or [c for c in header if c not in (task_column, target)]
    col = {c: [r[header.index(c)] for r in body] for c in header}
    absent = {c: [v.lower() in MISSING for v in col[c]] for c in header}
    used = [task_column, target, *feats]
    keep = [i for i in range(len(body)) if fill != "drop" or not any(absent[c][i] for c in used)]
    values = sorted({col[task_column][i] for i in keep})
    split_values = split_tasks(values, task_split)
    tid = {v: i for i, v in enumerate(values)}
    task = [tid[col[task_column][i]] for i in keep]
    train = {tid[v] for v in split_values["train"]}
    columns, names, categories = [], [], {}
    for c in feats:
        vals, gone = [col[c][i] for i in keep], [absent[c][i] for i in keep]
        if all(g or _number(v) is not None for v, g in zip(vals, gone)):
            nums = [math.nan if g else float(v) for v, g in zip(vals, gone)]
            if fill == "mean" and any(gone):
                fill_in = np.array([v for v, g, t in zip(nums, gone, task) if not g and t in train]).mean()
                nums = [fill_in if g else v for v, g in zip(nums, gone)]
            columns.append(nums)
            names.append(c)
        else:
            categories[c] = sorted({v for v, g, t in zip(vals, gone, task) if not g and t in train})
            for cat in categories[c]:
                columns.append([float(v == cat and not g) for v, g in zip(vals, gone)])
                names.append(f"{c}={cat}")
    x = torch.tensor(columns, dtype=torch.float64).T.contiguous()
    if kind == "regression":
        y, classes = torch.tensor([float(col[target][i]) for i in keep], dtype=torch.float64), ()
    else:
        classes = tuple(sorted({col[target][i] for i in keep}))
        y = torch.tensor([classes.index(col[target][i]) for i in keep])
    task = torch.tensor(task)
    counts = torch.bincount(task, minlength=len(values))
    splits = {s: [tid[v] for v in vs if counts[tid[v]] >= min_rows] for s, vs in split_values.items()}
    tr = torch.isin(task, torch.tensor(splits["train"]))
    mean = torch.stack([x[:, k][tr].mean() for k in range(x.shape[1])])
    std = torch.stack([x[:, k][tr].std(unbiased=False) for k in range(x.shape[1])])
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    target_mean, target_std = ((y[tr].mean().item(), y[tr].std(unbiased=False).item() or 1.0)
                               if kind == "regression" else (0.0, 1.0))
    return (x, y, task, tuple(names), categories, classes, tuple(values), splits, mean, std, target_mean,
            target_std)


def messy_tasks(path, seed):
    """Tasks with a numeric, a categorical and an integer-coded column, a numeric-looking column that turns
    categorical on its last row, missing values in every spelling, a line of empty fields and padded cells."""
    rng = random.Random(seed)
    rows = [[f"t{t}", f"{rng.uniform(-5, 5):.{rng.randint(0, 6)}f}", rng.choice(["red", " green", "blue ", "Red"]),
             str(rng.randint(0, 3)), str(rng.randint(0, 9)), f"{rng.gauss(0, 10):.3f}", rng.choice("abc")]
            for t in range(12) for _ in range(rng.randint(2, 14))]
    rng.shuffle(rows)
    rows[-1][4] = "nine"
    for k, miss in enumerate(["", "NA", " nan", "None", "N/A ", "null"]):
        rows[rng.randrange(len(rows))][1 + k % 4] = miss
    rows.insert(len(rows) // 2, [""] * 7)
    return write_csv(path, ["site", "num", "colour", "code", "late", "y", "label"], rows)


SMALL_BATCHES = {"ARROW_BLOCK": 96, "ROW_BATCH": 3, "GROUP_BLOCK": 4}


@pytest.mark.parametrize("reader", ["columnar", "columnar in tiny batches", "rows in tiny batches"])
@pytest.mark.parametrize("kind, target, fill", [("regression", "y", "drop"), ("regression", "y", "mean"),
                                                ("classification", "label", "drop"), ("regression", "y", "none")])
def test_streamed_encoding_equals_the_rules_applied_to_rows(tmp_path, monkeypatch, reader, kind, target, fill):
    path = messy_tasks(tmp_path / "m.csv", seed=len(reader) + len(fill))
    features = ("num", "colour", "code", "late") if fill != "none" else ("code",)
    if fill == "none":  # a file without missing values in the columns used
        path = write_csv(tmp_path / "clean.csv", ["site", "code", "y"],
                         [[f"t{i % 7}", i % 3 if i != 40 else "x", i / 8] for i in range(90)])
    if "tiny" in reader:
        for name, value in SMALL_BATCHES.items():
            monkeypatch.setattr(tabular if name == "GROUP_BLOCK" else tables, name, value)
    if reader.startswith("rows"):
        monkeypatch.setattr(tables, "_arrow_header", lambda path: None)
    kw = dict(kind=kind, fill=fill, min_rows=3, task_split=(0.5, 0.25, 0.25))
    d = load_csv(path, "site", target, features, **kw)
    x, y, task, names, categories, classes, values, splits, mean, std, target_mean, target_std = \
        reference_encoding(path, "site", target, features, **kw)
    assert d.feature_names == names and d.categories == categories and d.classes == classes
    assert d.tasks == values and d.splits == splits
    for mine, theirs in [(d.x, x), (d.y, y), (d.task, task), (d.mean, mean), (d.std, std)]:
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)  # bit for bit
    assert (d.target_mean, d.target_std) == (target_mean, target_std)
    assert "late" in categories or fill == "none"  # numbers up to its last row: categorical all the same
    # Episodes: each task's rows in file order, as ids into x.
    for split in ("train", "test"):
        tasks = CSVTasks(d, split, 1, 2)
        for s, t in enumerate(d.splits[split]):
            rows = torch.nonzero(d.task == t).squeeze(1)
            assert tasks.counts[s] == len(rows) and torch.equal(tasks.index[s, :len(rows)], rows)
        want = d.y if kind == "classification" else ((d.y - d.target_mean) / d.target_std).float()
        assert torch.equal(tasks.targets, want)


@pytest.mark.parametrize("rows, fill, message", [
    ([(2500, 1, "inf")], "none", "line 2502 column 'x' is 'inf': not a finite number"),
    ([(2500, 2, "-1e999")], "none", "line 2502 column 'y' is '-1e999': not a finite number"),
    ([(100, 1, ""), (2900, 2, "NA")] + [(k, 1, "") for k in range(2000, 2012)], "none",
     "14 row(s) have missing values (lines 102, 2002, 2003, 2004, 2005, 2006, 2007, 2008, 2009, 2010 and 4 more; "
     "columns x, y)"),
    ([(7, 0, ""), (2900, 0, "na")], "mean", "2 row(s) miss the task or target value (lines 9, 2902)"),
    ([(2990, 2, "high")], "drop", "line 2992: target 'y' is 'high', not a number"),
    ([(1500, 1, "1e300")], "drop", "column 'x' holds values up to 1e+300, too large"),
])
def test_errors_name_the_line_whatever_the_batch(tmp_path, monkeypatch, rows, fill, message):
    table = [[f"t{i % 20}", i % 17, i % 5] for i in range(3000)]
    for i, j, value in rows:
        table[i][j] = value
    path = write_csv(tmp_path / "e.csv", ["task", "x", "y"], table)
    for batches in ({}, SMALL_BATCHES, {"ARROW_BLOCK": 4096}):
        for name, value in batches.items():
            monkeypatch.setattr(tabular if name == "GROUP_BLOCK" else tables, name, value)
        with pytest.raises(UserError) as e:
            load_csv(path, "task", "y", fill=fill)
        assert message in str(e.value), (batches, str(e.value))


# --------------------------------------------------------------------------------------
# Bad input through the CLI: exit 2, a message naming the problem and the fix


def _train(cli, path, *extra):
    return cli("train", "csv", "--path", path, "--out-dir", path.parent / "runs", "--iterations", "2", "--threads", "1",
               "--no-progress", "--no-tensorboard", "--eval-tasks", "10", "--val-tasks", "5", *extra)


@pytest.fixture
def good_csv(tmp_path):
    return linear_tasks(tmp_path / "good.csv")


@pytest.mark.parametrize("args, message", [
    (["--task-column", "patient", "--target", "y"],
     r"--task-column: column 'patient' is not in .*; its columns are: site, x, tid, rid, y"),
    (["--task-column", "site", "--target", "label"], r"--target: column 'label' is not in .*columns are: site"),
    (["--task-column", "site", "--target", "y", "--features", "x", "age"], r"--features: column 'age'"),
    (["--task-column", "site", "--target", "y", "--features", "x", "y"], r"--features lists the target 'y'"),
    (["--target", "y"], r"name the task column with --task-column; .* has columns: site, x"),
    (["--task-column", "site", "--target", "y", "--kind", "ranking"], r"kind must be regression or classi"),
    (["--task-column", "site", "--target", "y", "--fill", "median"], r"fill must be none, drop or mean"),
    (["--task-column", "site", "--target", "y", "--k-shot", "10", "--k-query", "10", "--small-tasks", "error"],
     r"have fewer than 20 rows \(k_shot \+ k_query\)"),
    (["--task-column", "site", "--target", "y", "--k-shot", "10", "--k-query", "10"],
     r"no train task has the 20 rows .*largest has 16.*lower --k-shot"),
])
def test_bad_arguments_exit_2(cli, good_csv, args, message):
    code, out, err = _train(cli, good_csv, *args)
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err), err


def test_bad_files_exit_2(cli, tmp_path):
    missing = write_csv(tmp_path / "missing.csv", ["site", "x", "y"],
                        [[f"t{t}", "" if (t, i) in ((2, 1), (4, 3)) else i, i] for t in range(10) for i in range(6)])
    code, _, err = _train(cli, missing, "--task-column", "site", "--target", "y")
    assert code == 2 and "2 row(s) have missing values (lines 15, 29; columns x)" in err and "--fill drop" in err
    words = write_csv(tmp_path / "words.csv", ["site", "x", "y"],
                      [[f"t{t}", i, "high" if i else "low"] for t in range(10) for i in range(6)])
    code, _, err = _train(cli, words, "--task-column", "site", "--target", "y")
    assert code == 2 and "target 'y' is 'low', not a number" in err and "--kind classification" in err
    cats = write_csv(tmp_path / "cats.csv", ["site", "zip", "y"],
                     [[f"t{t}", f"z{t}{i}", i] for t in range(10) for i in range(6)])
    code, _, err = _train(cli, cats, "--task-column", "site", "--target", "y")
    assert code == 2 and "column 'zip' is categorical with 42 categories" in err and "--max-categories" in err
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("site,x,y\nt1,1,2\nt1,1\n")
    code, _, err = _train(cli, ragged, "--task-column", "site", "--target", "y")
    assert code == 2 and "line 3 has 2 fields, the header 3" in err
    code, _, err = _train(cli, tmp_path / "nope.csv", "--task-column", "site", "--target", "y")
    assert code == 2 and "CSV file not found" in err
    code, _, err = cli("train", "csv", "--task-column", "site", "--target", "y")
    assert code == 2 and "pass --path data.csv" in err
    few = write_csv(tmp_path / "few.csv", ["site", "x", "y"], [[f"t{t}", i, i] for t in range(2) for i in range(30)])
    code, _, err = _train(cli, few, "--task-column", "site", "--target", "y")
    assert code == 2 and "has 2 task(s)" in err


# --------------------------------------------------------------------------------------
# End to end


def test_cli_end_to_end_regression_stores_standardisation(cli, good_csv):
    code, out, err = _train(cli, good_csv, "--task-column", "site", "--target", "y", "--iterations", "30",
                            "--threads", "1", "--run-name", "lin")
    assert code == 0, err
    run = good_csv.parent / "runs" / "lin"
    result = json.loads((run / "eval.json").read_text())
    assert set(result["loss"]) == {"maml", "pretrain", "scratch"}
    assert result["splits"] == {"train": 14, "val": 3, "test": 3}
    assert "pooled" in out and "per-task from scratch" in out and "maml after 10 steps: query loss" in out
    assert set(result["loss"]["maml"]) >= {"diff_vs_pretrain", "diff_vs_scratch"}
    # Noise-free linear tasks: 100 Adam steps on 5 support rows fit each line closely.
    assert result["loss"]["scratch"]["100"]["loss"] < 0.05
    for name in ("maml", "pretrain"):
        losses = [result["loss"][name][s]["loss"] for s in ("0", "10")]
        assert all(l == l and l < 10 for l in losses)
        assert losses[1] < losses[0]  # adaptation helps on every trained model
    tensors, state = checkpoint.load(run / "checkpoint.safetensors")
    d = load_csv(good_csv, "site", "y", min_rows=15)
    torch.testing.assert_close(tensors["buffer/0.mean"].double(), d.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(tensors["buffer/0.std"].double(), d.std, atol=1e-5, rtol=0)
    pre = state["model_spec"]["preprocess"]
    assert pre["target_mean"] == pytest.approx(d.target_mean) and pre["features"] == ["x", "tid", "rid"]


def test_cli_end_to_end_classification(cli, tmp_path):
    rows = [[f"t{t}", ["a", "b"][i % 2], i / 10, int((i / 10 > 0.5) != (t % 2 == 0))]
            for t in range(12) for i in range(16)]
    path = write_csv(tmp_path / "cls.csv", ["site", "group", "x", "label"], rows)
    code, out, err = _train(cli, path, "--task-column", "site", "--target", "label", "--kind", "classification",
                            "--iterations", "5", "--run-name", "cls")
    assert code == 0, err
    result = json.loads((tmp_path / "runs" / "cls" / "eval.json").read_text())
    assert result["kind"] == "classification"
    cfg = cfg_for(path, target="label", kind="classification")
    assert cfg.loss == "cross_entropy"
    for name in ("maml", "pretrain"):
        assert 0 <= result["loss"][name]["0"]["acc"] <= 1
