"""Input formats (mamlkit/use/formats.py) and the table encoding (mamlkit/data/tables.py).

Every registered format works, through `mamlkit adapt`, for every kind of family that may declare it: the
command's predictions equal the Python API's on the same inputs. A classification family with vector
inputs adapts (it ended in a torch traceback before the formats were a registry). The table encoding
round-trips: labels and values come back from the model's targets, a spec from its JSON, and rows fitted
in memory encode as a meta-training file of the same rows does.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import write_csv

import mamlkit
from mamlkit import tasks
from mamlkit.base.batch import TaskBatch
from mamlkit.base.errors import UserError
from mamlkit.loop import train
from mamlkit.presets import preset_config
from mamlkit.tasks import ClassifierOptions, EpisodeOptions, MLPOptions, TaskFamily, register_task_family

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# A classification family with vector inputs: the plane cut into N sectors, turned at random


@dataclass(frozen=True)
class Sectors:
    n_way: int
    k_support: int
    k_query: int
    kind: str = "classification"

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        turn = 2 * math.pi * torch.rand(num_tasks, 1, generator=generator)
        x = 6 * torch.rand(num_tasks, self.n_way * (self.k_support + self.k_query), 2, generator=generator) - 3
        angle = torch.remainder(torch.atan2(x[..., 1], x[..., 0]) - turn, 2 * math.pi)
        y = (angle * self.n_way / (2 * math.pi)).long().clamp(max=self.n_way - 1)
        k = self.n_way * self.k_support
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


SECTORS = TaskFamily(name="sectors", build=lambda cfg, split: Sectors(cfg.n_way, cfg.k_shot, cfg.k_query),
                     model_spec=lambda cfg: {"name": "mlp", "in_features": 2, "hidden": list(cfg.hidden_sizes),
                                             "out_features": cfg.n_way},
                     input_spec=lambda cfg: {"type": "vector"},
                     options=(MLPOptions, EpisodeOptions, ClassifierOptions))


@pytest.fixture(scope="module")
def sectors():
    before = dict(tasks.TASK_FAMILIES)
    register_task_family(SECTORS)
    yield
    tasks.TASK_FAMILIES.clear()
    tasks.TASK_FAMILIES.update(before)


def _checkpoint(root: Path, name: str, preset: str, record: bool = False, **overrides) -> Path:
    """An untrained checkpoint, a run folder; ``record``: with the input record training writes (the input
    width, which vector inputs need), taken from one training task."""
    cfg = preset_config(preset, {"out_dir": str(root), "progress": False, "tensorboard": False, **overrides})
    trainer = train.new_trainer(cfg, root / name)
    trainer.input = train.input_record(cfg) if record else None
    (root / name).mkdir()
    train.save_checkpoint(trainer, root / name / "checkpoint.safetensors")
    return root / name


POINTS = [[2.0, 1.0, "north"], [1.0, 2.0, "north"], [-1.0, 2.0, "north"], [2.0, -1.0, "south"],
          [1.0, -2.0, "south"], [-1.0, -2.0, "south"]]
QUERY = [[0.5, 2.5], [-2.0, -2.5], [2.5, -0.3]]


def test_a_classification_family_with_vector_inputs_adapts_with_labels(sectors, cli, tmp_path):
    run = _checkpoint(tmp_path, "sectors", "sinusoid", True, task="sectors", n_way=2, hidden_sizes=(8,),
                      inner_lr=0.5, test_inner_steps=3)
    write_csv(tmp_path / "s.csv", ["x0", "x1", "label"], POINTS)
    write_csv(tmp_path / "q.csv", ["x0", "x1"], QUERY)
    code, out, err = cli("adapt", run, "--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv")
    assert code == 0 and "Traceback" not in err, err
    assert "6 support points of 2 classes (north, south)" in err
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["x0"] for r in rows] == ["0.5", "-2.0", "2.5"] and {r["prediction"] for r in rows} <= {"north", "south"}
    # The same numbers as the Python API on tensors: labels numbered in sorted order, north 0, south 1.
    learner = mamlkit.load(run)
    x = torch.tensor([p[:2] for p in POINTS], dtype=torch.float64)
    pred = learner.adapt(x, torch.tensor([0, 0, 0, 1, 1, 1])).predict(torch.tensor(QUERY, dtype=torch.float64))
    probs = torch.tensor([[float(r["p[north]"]), float(r["p[south]"])] for r in rows])
    torch.testing.assert_close(probs, pred.probs.float(), atol=1e-6, rtol=0)
    assert [r["prediction"] for r in rows] == [["north", "south"][int(i)] for i in pred.labels]


def test_vector_classification_with_class_ids_as_labels_adapts_without_a_traceback(sectors, cli, tmp_path):
    """Numeric labels were read as regression targets, and torch's cross-entropy raised on their shape."""
    run = _checkpoint(tmp_path, "sectors", "sinusoid", True, task="sectors", n_way=2, hidden_sizes=(8,))
    write_csv(tmp_path / "s.csv", ["x0", "x1", "label"], [p[:2] + [int(p[2] == "south")] for p in POINTS])
    write_csv(tmp_path / "q.csv", ["x0", "x1"], QUERY)
    code, out, err = cli("adapt", run, "--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv",
                         "--steps", "2")
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    learner = mamlkit.load(run)
    x = torch.tensor([p[:2] for p in POINTS], dtype=torch.float64)
    pred = learner.adapt(x, torch.tensor([0, 0, 0, 1, 1, 1]), 2).predict(torch.tensor(QUERY, dtype=torch.float64))
    _same_probs(rows, pred, ["0", "1"])


def test_vector_classification_refuses_a_missing_label_and_too_many_classes(sectors, cli, tmp_path):
    run = _checkpoint(tmp_path, "sectors", "sinusoid", True, task="sectors", n_way=2, hidden_sizes=(8,))
    write_csv(tmp_path / "q.csv", ["x0", "x1"], QUERY)
    write_csv(tmp_path / "gap.csv", ["x0", "x1", "label"], POINTS[:2] + [[0.0, 1.0, "NA"]] + POINTS[3:])
    code, _, err = cli("adapt", run, "--support", tmp_path / "gap.csv", "--query", tmp_path / "q.csv")
    assert code == 2 and "the label is missing on line(s) 4" in err, err
    write_csv(tmp_path / "three.csv", ["x0", "x1", "label"], POINTS + [[0.0, 3.0, "east"]])
    code, _, err = cli("adapt", run, "--support", tmp_path / "three.csv", "--query", tmp_path / "q.csv")
    assert code == 2 and "3 classes" in err and "--reset-head" in err, err
    write_csv(tmp_path / "short.csv", ["x0", "label"], [[1.0, "north"], [2.0, "south"]])
    code, _, err = cli("adapt", run, "--support", tmp_path / "short.csv", "--query", tmp_path / "q.csv")
    assert code == 2 and "2 input column(s) and a label column" in err, err


# --------------------------------------------------------------------------------------
# Every registered format, for every kind of family that may declare it, through `mamlkit adapt`


def _image_case(root: Path):
    from PIL import Image

    from mamlkit.use.io import load_image

    run = _checkpoint(root, "img", "omniglot-5w1s", filters=8)
    rng = random.Random(0)
    for c in range(3):
        (root / "support" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (28, 28), color=rng.randrange(256)).save(root / "support" / f"c{c}" / f"{i}.png")
    (root / "query").mkdir()
    Image.new("L", (28, 28), color=7).save(root / "query" / "q.png")
    learner = mamlkit.load(run)
    sx = torch.stack([load_image(p, learner.input, set())
                      for c in range(3) for p in sorted((root / "support" / f"c{c}").iterdir())])
    qx = load_image(root / "query" / "q.png", learner.input, set())[None]
    pred = learner.adapt(sx, torch.tensor([0, 0, 1, 1, 2, 2])).predict(qx)
    return run, root / "support", [root / "query"], [], lambda rows: _same_probs(rows, pred, ["c0", "c1", "c2"])


def _text_case(root: Path):
    run = _checkpoint(root, "text", "clinc-5w1s", encoder_mode="frozen")
    support = [["what is my balance", "balance"], ["how much money do i have", "balance"],
               ["book a flight to paris", "flight"], ["i need a plane ticket", "flight"]]
    write_csv(root / "s.csv", ["text", "label"], support)
    (root / "q.txt").write_text("show my account balance\n")
    pred = mamlkit.load(run).adapt([t for t, _ in support], [lab for _, lab in support]).predict(
        ["show my account balance"])
    return run, root / "s.csv", [root / "q.txt"], [], lambda rows: _same_probs(rows, pred, ["balance", "flight"])


def _vector_regression_case(root: Path):
    run = _checkpoint(root, "sin", "sinusoid", True, hidden_sizes=(8,))
    write_csv(root / "s.csv", ["x", "y"], [[-1.0, 0.5], [0.0, 1.0], [2.0, -0.5]])
    write_csv(root / "q.csv", ["x"], [[0.5], [1.5]])
    pred = mamlkit.load(run).adapt(torch.tensor([[-1.0], [0.0], [2.0]], dtype=torch.float64),
                                   torch.tensor([[0.5], [1.0], [-0.5]], dtype=torch.float64)).predict(
        torch.tensor([[0.5], [1.5]], dtype=torch.float64))
    return run, root / "s.csv", [root / "q.csv"], [], lambda rows: _same_values(rows, pred.values.reshape(-1))


def _vector_classification_case(root: Path):
    run = _checkpoint(root, "sectors", "sinusoid", True, task="sectors", n_way=2, hidden_sizes=(8,))
    write_csv(root / "s.csv", ["x0", "x1", "label"], POINTS)
    write_csv(root / "q.csv", ["x0", "x1"], QUERY)
    pred = mamlkit.load(run).adapt(torch.tensor([p[:2] for p in POINTS], dtype=torch.float64),
                                   ["north"] * 3 + ["south"] * 3).predict(torch.tensor(QUERY, dtype=torch.float64))
    return run, root / "s.csv", [root / "q.csv"], [], lambda rows: _same_probs(rows, pred, ["north", "south"])


def _table_rows(n: int, seed: int) -> list[list]:
    rng = random.Random(seed)
    return [[f"t{i % 6}", f"{rng.uniform(0, 1):.3f}", rng.choice(["a", "b"]), f"{rng.uniform(-1, 1):.3f}",
             rng.choice(["hi", "lo"])] for i in range(n)]


def _table_case(kind: str):
    def case(root: Path):
        path = write_csv(root / "train.csv", ["site", "x", "colour", "y", "label"], _table_rows(120, 0))
        target = "y" if kind == "regression" else "label"
        run = _checkpoint(root, kind, "csv", path=str(path), task_column="site", target=target,
                          features=("x", "colour"), kind=kind)
        rows = _table_rows(10, 1)
        write_csv(root / "s.csv", ["x", "colour", target], [[r[1], r[2], r[3 if target == "y" else 4]]
                                                           for r in rows[:6]])
        write_csv(root / "q.csv", ["id", "x", "colour"], [[f"q{i}", r[1], r[2]] for i, r in enumerate(rows[6:])])
        support = [{"x": r[1], "colour": r[2]} for r in rows[:6]]
        targets = [r[3] if target == "y" else r[4] for r in rows[:6]]
        pred = mamlkit.load(run).adapt(support, targets).predict([{"x": r[1], "colour": r[2]} for r in rows[6:]])

        def check(out: list[dict]) -> None:
            assert [r["id"] for r in out] == ["q0", "q1", "q2", "q3"] and [r["row"] for r in out] == list("0123")
            if kind == "regression":
                _same_values(out, pred.values.reshape(-1))
            else:
                _same_probs(out, pred, ["hi", "lo"])
        return run, root / "s.csv", [root / "q.csv"], [], check
    return case


def _same_probs(rows: list[dict], pred, names: list[str]) -> None:
    probs = torch.tensor([[float(r[f"p[{n}]"]) for n in names] for r in rows])
    torch.testing.assert_close(probs, pred.probs.float(), atol=1e-6, rtol=0)
    assert [r["prediction"] for r in rows] == [names[int(i)] for i in pred.labels]


def _same_values(rows: list[dict], values: torch.Tensor) -> None:
    assert [float(r["prediction"]) for r in rows] == pytest.approx(values.tolist(), rel=1e-6, abs=1e-9)


CASES = {("image", "classification"): _image_case, ("text", "classification"): _text_case,
         ("vector", "regression"): _vector_regression_case,
         ("vector", "classification"): _vector_classification_case,
         ("table", "regression"): _table_case("regression"), ("table", "classification"): _table_case("classification")}


def test_every_registered_format_has_a_case_here():
    from mamlkit.use import formats

    assert set(formats.FORMATS) == set(CASES)
    assert {t for t, _ in formats.FORMATS} == set(tasks.INPUT_TYPES)


@pytest.mark.parametrize("fmt", list(CASES), ids=lambda f: "-".join(f))
def test_every_format_adapts_through_the_cli_as_the_api_does(fmt, sectors, cli, tmp_path):
    run, support, query, extra, check = CASES[fmt](tmp_path)
    assert mamlkit.load(run).input["type"] == fmt[0] and mamlkit.load(run).kind == fmt[1]
    code, out, err = cli("adapt", run, "--support", support, "--query", *query, *extra)
    assert code == 0, err
    check(list(csv.DictReader(out.splitlines())))


def test_a_format_no_family_of_that_kind_may_declare_is_refused(sectors, cli, tmp_path):
    from mamlkit.use import formats

    with pytest.raises(UserError, match=r"type 'image' for regression.*formats: image \(classification\)"):
        formats.lookup({"type": "image"}, "regression", "run")
    with pytest.raises(UserError, match="declares no raw input format"):
        formats.lookup(None, "classification", "run")


# --------------------------------------------------------------------------------------
# The table encoding


MIXED = [{"site": "s1", "a": "1", "c": "red", "y": "hi"}, {"site": "s1", "a": "2", "c": "blue", "y": "lo"},
         {"site": "s2", "a": "NA", "c": "", "y": "hi"}, {"site": "s2", "a": "4", "c": "red", "y": "lo"}]


def test_fit_encodes_a_mixed_table_as_the_rules_say_in_float64():
    from mamlkit.data import tables

    spec = tables.fit([{k: v for k, v in r.items() if k != "site"} for r in MIXED], "y", kind="classification",
                      fill="mean")
    assert spec.features == ("a", "c=blue", "c=red") and spec.categories == {"c": ["blue", "red"]}
    assert spec.classes == ("hi", "lo") and spec.columns == ["a", "c"]
    a = 7 / 3  # the missing value: the mean of 1, 2 and 4
    x = torch.tensor([[1, 0, 1], [2, 1, 0], [a, 0, 0], [4, 0, 1]], dtype=torch.float64)
    columns = [x[:, k].contiguous() for k in range(3)]  # column by column, as the encoding reduces them
    assert spec.mean == tuple(c.mean().item() for c in columns)
    assert spec.std == tuple(c.std(unbiased=False).item() for c in columns)
    encoded = tables.apply(spec, [{"a": "1", "c": "red"}, {"a": "NA", "c": "blue"}])
    assert torch.equal(encoded, torch.tensor([[1, 0, 1], [spec.mean[0], 1, 0]], dtype=torch.float32))


@pytest.mark.parametrize("kind, target", [("regression", "y"), ("classification", "label")])
def test_rows_fitted_in_memory_encode_as_the_meta_training_file(tmp_path, kind, target):
    from mamlkit.data import tables
    from mamlkit.tasks.tabular import load_csv

    rows = _table_rows(60, 2)
    rows[5][1] = "NA"  # a missing number, filled with the meta-train mean
    header = ["site", "x", "colour", "y", "label"]
    path = write_csv(tmp_path / "t.csv", header, rows)
    data = load_csv(path, "site", target, ("x", "colour"), kind=kind, fill="mean", task_split=(0.5, 0.25, 0.25))
    train = [dict(zip(header, r)) for r in rows if r[0] in data.split_values["train"]]
    spec = tables.fit([{k: r[k] for k in ("x", "colour", target)} for r in train], target, kind=kind,
                      fill="mean")
    assert spec.features == data.feature_names and spec.categories == data.categories
    assert spec.classes == data.classes
    # the file's encoding of the rows of meta-train tasks, bit for bit
    mask = torch.isin(data.task, torch.tensor(data.splits["train"]))
    assert torch.equal(tables.apply(spec, train), data.x[mask].float())
    assert spec.mean == tuple(data.mean.tolist()) and spec.std == tuple(data.std.tolist())
    assert (spec.target_mean, spec.target_std) == (data.target_mean, data.target_std)


def test_targets_round_trip_through_the_encoding():
    from mamlkit.data import tables

    labels = ["lo", "hi", "hi", "mid"]
    spec = tables.fit([{"x": i, "label": v} for i, v in enumerate(labels)], "label", kind="classification")
    ids = tables.encode_targets(spec, labels)
    assert ids.tolist() == [1, 0, 0, 2] and tables.inverse_targets(spec, ids) == labels
    values = [3.5, -1.25, 10.0, 0.0]
    spec = tables.fit([{"x": i, "y": v} for i, v in enumerate(values)], "y")
    assert spec.target_mean == pytest.approx(sum(values) / 4)
    y = tables.encode_targets(spec, values)
    assert y.shape == (4, 1) and y.mean().abs() < 1e-6
    assert tables.inverse_targets(spec, y.double()).reshape(-1).tolist() == pytest.approx(values, abs=1e-5)
    back = tables.TableSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec
    with pytest.raises(UserError, match="'x' is 'seven'"):
        tables.apply(spec, [{"x": "seven"}])


def test_a_checkpoint_of_a_csv_run_stores_the_encoding_the_spec_reads(tmp_path):
    from mamlkit.data import tables
    from mamlkit.use import formats

    path = write_csv(tmp_path / "t.csv", ["site", "x", "colour", "y", "label"], _table_rows(120, 0))
    run = _checkpoint(tmp_path, "r", "csv", path=str(path), task_column="site", target="y", fill="mean")
    learner = mamlkit.load(run)
    spec = formats.table_spec(learner.input, learner.model_spec)
    assert spec.fill == "mean" and spec.preprocess() == learner.model_spec["preprocess"]
    assert list(spec.mean) == learner.model_spec["mean"] and spec.columns == ["x", "colour", "label"]
    assert isinstance(spec, tables.TableSpec)


def test_the_reader_bounds_the_files_it_holds(tmp_path, monkeypatch):
    from mamlkit.base.limits import LimitError
    from mamlkit.data import tables

    path = write_csv(tmp_path / "t.csv", ["a", "b"], [[1, 2]] * 5)
    monkeypatch.setattr(tables, "MAX_TABLE_ROWS", 4)
    with pytest.raises(LimitError, match="data rows of .*t.csv is 5"):
        tables.read_rows(path)
    monkeypatch.setattr(tables, "MAX_TABLE_BYTES", 10)
    with pytest.raises(LimitError, match="size of"):
        tables.read_rows(path)
    monkeypatch.undo()
    wide = write_csv(tmp_path / "w.csv", [f"c{i}" for i in range(6)], [[0] * 6])
    monkeypatch.setattr(tables, "MAX_TABLE_COLUMNS", 5)
    with pytest.raises(LimitError, match="columns of"):
        tables.read_rows(wide)
    long = tmp_path / "long.csv"
    long.write_text("a,b\n1," + "x" * 200_000 + "\n")
    with pytest.raises(LimitError, match="line 2 holds a cell of more than 131,072 characters"):
        tables.read_rows(long)
