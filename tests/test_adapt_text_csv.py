
"""`mamlkit adapt` and the Python API on text (clinc) and CSV-task (csv) checkpoints: the CLI
equals the API equals a hand computation (embeddings, one-hot encoding, target standardisation and its
inverse), adapted models beat unadapted ones on separable toy tasks, round trips through
``TaskModel.save``/``mamlkit.load``, and every bad input exits with code 2 and a message.

Text checkpoints are written untrained (``new_trainer`` + ``save_checkpoint``: no CLINC150 data needed;
the head adapts in the inner loop) plus the shipped, trained ``clinc-5w1s``; the encoder loads once
per session (``mamlkit.data.encoders.load`` is cached). CSV checkpoints come from short CLI trainings on
synthetic tables whose training file is deleted afterwards, so adapting relies on the checkpoint alone.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from helpers import write_csv

import mamlkit
from mamlkit.data import encoders
from mamlkit.engine.functional import call
from mamlkit.loop import train
from mamlkit.presets import preset_config
from mamlkit.use import api

torch.set_num_threads(1)

SUPPORT = [("what is my account balance", "balance"), ("how much money is in checking", "balance"),
           ("book a flight to paris", "flight"), ("i need a plane ticket to rome", "flight"),
           ("will it rain tomorrow", "weather"), ("what's the forecast for today", "weather")]
QUERY = ["how much is in my savings account", "find me a flight to tokyo", "is it going to snow"]


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """Untrained clinc checkpoints, frozen (ANIL head) and finetune (last layer + head): run dirs."""
    root = tmp_path_factory.mktemp("text")
    out = {}
    for mode, extra in (("frozen", {}), ("finetune", {"algo": "maml", "inner_lr": 0.5, "test_inner_steps": 2})):
        cfg = preset_config("clinc-5w1s", {"encoder_mode": mode, "out_dir": str(root), "progress": False, **extra})
        trainer = train.new_trainer(cfg, root / mode)
        (root / mode).mkdir()
        train.save_checkpoint(trainer, root / mode / "checkpoint.safetensors")
        out[mode] = root / mode
    return out


@pytest.fixture
def text_files(tmp_path):
    write_csv(tmp_path / "support.csv", ["text", "label"], SUPPORT)
    (tmp_path / "query.txt").write_text("\n".join(QUERY) + "\n\n")
    write_csv(tmp_path / "query.csv", ["id", "text"], [[f"q{i}", t] for i, t in enumerate(QUERY)])
    return tmp_path


def test_text_cli_equals_api_equals_embeddings(text_ckpt, text_files, cli, tmp_path):
    code, out, err = cli("adapt", text_ckpt["frozen"], "--support", text_files / "support.csv",
                         "--query", text_files / "query.txt", "--output", tmp_path / "p.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["text"] for r in rows] == QUERY and [r["row"] for r in rows] == [0, 1, 2]
    learner = mamlkit.load(text_ckpt["frozen"])
    assert learner.input["mode"] == "frozen"
    task_model = learner.adapt([t for t, _ in SUPPORT], [lab for _, lab in SUPPORT])
    assert task_model.class_names == ["balance", "flight", "weather"]
    pred = task_model.predict(QUERY)
    # By hand: sentence embeddings, the meta-learner's own inner loop, the first 3 logits.
    fast = learner.meta.adapt(encoders.encode([t for t, _ in SUPPORT]), torch.tensor([0, 0, 1, 1, 2, 2]), 10)
    probs = call(learner.meta.model, fast, {}, encoders.encode(QUERY))[:, :3].softmax(-1)
    torch.testing.assert_close(pred.probs, probs, atol=1e-6, rtol=0)
    names = task_model.class_names
    cli_probs = torch.tensor([[r[f"p[{n}]"] for n in names] for r in rows])
    torch.testing.assert_close(cli_probs, pred.probs, atol=1e-6, rtol=0)
    assert [r["prediction"] for r in rows] == [names[i] for i in pred.labels]
    # The untrained head separates these intents after adapting, not before.
    assert [r["prediction"] for r in rows] == ["balance", "flight", "weather"]
    before = learner.adapt([t for t, _ in SUPPORT], [lab for _, lab in SUPPORT], steps=0).predict(QUERY)
    assert (pred.probs.diagonal() > 0.5).all() and (before.probs.diagonal() < 0.4).all()
    # Export and reload: same numbers from raw text; a CSV query keeps its id column.
    task_model.save(tmp_path / "intents.safetensors")
    again = mamlkit.load(tmp_path / "intents.safetensors")
    assert isinstance(again, api.TaskModel) and again.class_names == names
    assert torch.equal(again.predict(QUERY).probs, pred.probs)
    code, out, err = cli("adapt", text_ckpt["frozen"], "--support", text_files / "support.csv",
                         "--query", text_files / "query.csv")
    lines = list(csv.DictReader(out.splitlines()))
    assert code == 0 and [r["id"] for r in lines] == ["q0", "q1", "q2"]
    assert [float(r["p[flight]"]) for r in lines] == [r["p[flight]"] for r in rows]


def test_text_finetune_adapts_the_layer_on_hidden_states(text_ckpt, tmp_path):
    learner = mamlkit.load(text_ckpt["finetune"])
    assert learner.input == {"type": "text", "encoder": "all-MiniLM-L6-v2", "package": encoders.PACKAGE,
                             "mode": "finetune", "hidden_layer": 5, "max_tokens": 24}
    texts, labels = [t for t, _ in SUPPORT], [lab for _, lab in SUPPORT]
    task_model = learner.adapt(texts, labels)
    # By hand: the hidden states entering layer 5, 24 tokens, through float16 as the training cache.
    hidden = encoders.encode(texts, hidden_layer=5, pad_to=24)[1].half().float()
    fast = learner.meta.adapt(hidden, torch.tensor([0, 0, 1, 1, 2, 2]), 2)
    assert any(k.startswith("body.") and not torch.equal(v, task_model.model.get_parameter(k))
               for k, v in task_model.params.items())  # the encoder layer itself adapted
    q = encoders.encode(QUERY, hidden_layer=5, pad_to=24)[1].half().float()
    expected = call(learner.meta.model, fast, {}, q)[:, :3].softmax(-1)
    pred = task_model.predict(QUERY)
    torch.testing.assert_close(pred.probs, expected, atol=1e-6, rtol=0)
    task_model.save(tmp_path / "ft.safetensors")
    torch.testing.assert_close(mamlkit.load(tmp_path / "ft.safetensors").predict(QUERY).probs, expected,
                               atol=1e-6, rtol=0)


def test_shipped_text_model_adapts_on_the_shipped_example(cli, tmp_path):
    code, out, err = cli("example", "clinc", tmp_path / "ex")
    assert code == 0 and "support.csv" in out
    code, out, err = cli("adapt", "clinc-5w1s", "--support", tmp_path / "ex" / "support.csv",
                         "--query", tmp_path / "ex" / "query.txt")
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    # The example's 5 queries are, in order, one of each of the 5 intents (sorted: the class order).
    names = sorted({r["label"] for r in csv.DictReader(open(tmp_path / "ex" / "support.csv"))})
    truth = ["book_table", "reset_password", "track_package", "cancel_subscription", "report_outage"]
    assert [r["prediction"] for r in rows] == truth
    p_true = [float(r[f"p[{t}]"]) for r, t in zip(rows, truth)]
    code, out, _ = cli("adapt", "clinc-5w1s", "--support", tmp_path / "ex" / "support.csv",
                       "--query", tmp_path / "ex" / "query.txt", "--steps", "0")
    p_before = [float(r[f"p[{t}]"]) for r, t in zip(csv.DictReader(out.splitlines()), truth)]
    # Adapted: every query right with p > 0.4 (chance 0.2); the meta-learned initial head is near uniform.
    assert len(names) == 5 and min(p_true) > 0.4 and sum(p_true) / 5 > 0.6 and max(p_before) < 0.25


@pytest.mark.parametrize("case, message", [
    ("no_text_column", "has no column 'text' (the utterances); its columns are words, label"),
    ("no_label_column", "has no column 'label' (the class labels)"),
    ("single_label", "has a single label ('balance')"),
    ("empty_text", "empty text or label on line(s) 3"),
    ("missing_query", "query file not found"),
    ("empty_query", "holds no utterances"),
    ("query_csv_without_text", "has no column 'text'"),
    ("bad_id_column", "--id-column 'key' is not a column"),
    ("six_classes", "--reset-head"),
    ("two_query_files", "takes one query file"),
])
def test_text_bad_input_exits_2(text_ckpt, text_files, cli, case, message):
    support, query, extra = text_files / "support.csv", [text_files / "query.txt"], []
    rows = list(SUPPORT)
    if case == "no_text_column":
        support = write_csv(text_files / "s.csv", ["words", "label"], rows)
    elif case == "no_label_column":
        support = write_csv(text_files / "s.csv", ["text", "intent"], rows)
    elif case == "single_label":
        support = write_csv(text_files / "s.csv", ["text", "label"], [(t, "balance") for t, _ in rows])
    elif case == "empty_text":
        support = write_csv(text_files / "s.csv", ["text", "label"], [rows[0], (" ", "flight"), *rows[2:]])
    elif case == "missing_query":
        query = [text_files / "nope.txt"]
    elif case == "empty_query":
        (text_files / "e.txt").write_text("\n  \n")
        query = [text_files / "e.txt"]
    elif case == "query_csv_without_text":
        query = [write_csv(text_files / "q2.csv", ["utterance"], [[q] for q in QUERY])]
    elif case == "bad_id_column":
        extra = ["--id-column", "key"]
    elif case == "six_classes":
        support = write_csv(text_files / "s.csv", ["text", "label"], [(t, f"c{i}") for i, (t, _) in enumerate(rows)])
    elif case == "two_query_files":
        query = query * 2
    code, _, err = cli("adapt", text_ckpt["frozen"], "--support", support, "--query", *query, *extra)
    assert code == 2 and message in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------
# CSV tasks


def store_rows(rng: random.Random, tasks: range, rows: int = 16) -> list[list]:
    """Task t: y = t + 2·x + (3 if colour is red), x ~ U(-1, 1); a categorical colour, no noise."""
    out = []
    for t in tasks:
        for i in range(rows):
            x, colour = rng.uniform(-1, 1), ["red", "green"][i % 2]
            out.append([f"s{t:02d}", f"{x:.5f}", colour, f"{t + 2 * x + (3 if colour == 'red' else 0):.5f}"])
    return out


@pytest.fixture(scope="module")
def csv_runs(tmp_path_factory):
    """A regression run (``--fill mean``) and a classification run; their training CSVs are deleted."""
    from mamlkit.cli import main

    root = tmp_path_factory.mktemp("csv")
    rng = random.Random(0)
    reg = write_csv(root / "reg.csv", ["site", "x", "colour", "y"], store_rows(rng, range(20)))
    cls_rows = [[f"s{t}", f"{i / 10:.1f}", ["a", "b"][i % 2], "high" if (i / 10 > 0.7) != (t % 2 == 0) else "low"]
                for t in range(12) for i in range(16)]
    cls = write_csv(root / "cls.csv", ["site", "x", "group", "label"], cls_rows)
    common = ["--out-dir", root, "--threads", "1", "--no-progress", "--no-tensorboard", "--eval-tasks", "10",
              "--val-tasks", "5", "--task-column", "site"]
    assert main(["train", "csv", "--path", str(reg), "--target", "y", "--iterations", "60", "--fill", "mean",
                 "--run-name", "reg", *map(str, common)]) == 0
    assert main(["train", "csv", "--path", str(cls), "--target", "label", "--kind", "classification",
                 "--iterations", "5", "--run-name", "cls", *map(str, common)]) == 0
    reg.unlink()
    cls.unlink()
    return {"reg": root / "reg", "cls": root / "cls"}


@pytest.fixture
def new_site(tmp_path):
    """A new task (offset 25, outside the meta-train offsets 0-19): 6 support rows, 8 query rows."""
    rows = store_rows(random.Random(1), [25], rows=14)
    write_csv(tmp_path / "support.csv", ["x", "colour", "y"], [r[1:] for r in rows[:6]])
    write_csv(tmp_path / "query.csv", ["id", "x", "colour"], [[f"r{i}", *r[1:3]] for i, r in enumerate(rows[6:])])
    return tmp_path, rows


def test_csv_regression_cli_equals_api_equals_hand_computation(csv_runs, new_site, cli, tmp_path):
    folder, rows = new_site
    code, out, err = cli("adapt", csv_runs["reg"], "--support", folder / "support.csv",
                         "--query", folder / "query.csv", "--output", tmp_path / "p.json")
    assert code == 0, err
    got = json.loads((tmp_path / "p.json").read_text())
    assert [r["id"] for r in got] == [f"r{i}" for i in range(8)] and [r["row"] for r in got] == list(range(8))
    learner = mamlkit.load(csv_runs["reg"])  # the training CSV is gone: all comes from the checkpoint
    spec = learner.model_spec
    pre = spec["preprocess"]
    assert pre["features"] == ["x", "colour=green", "colour=red"]
    # By hand: one-hot over the stored categories, target standardised with the stored statistics,
    # the meta-learner's own inner loop, then the output de-standardised.
    def encode(rs):
        return torch.tensor([[float(r[1]), r[2] == "green", r[2] == "red"] for r in rs], dtype=torch.float32)

    sy = (torch.tensor([[float(r[3])] for r in rows[:6]], dtype=torch.float64) - pre["target_mean"]) / pre["target_std"]
    fast = learner.meta.adapt(encode(rows[:6]), sy.float(), 10)
    out_std = call(learner.meta.model, fast, dict(learner.meta.model.named_buffers()), encode(rows[6:]))
    expected = out_std[:, 0].double() * pre["target_std"] + pre["target_mean"]
    assert [r["prediction"] for r in got] == pytest.approx(expected.tolist(), abs=1e-4)
    # The API on raw rows gives the same; so does the exported model.
    task_model = learner.adapt([{"x": r[1], "colour": r[2]} for r in rows[:6]], [r[3] for r in rows[:6]])
    values = task_model.predict([{"x": r[1], "colour": r[2]} for r in rows[6:]]).values[:, 0]
    torch.testing.assert_close(values.double(), expected, atol=1e-4, rtol=0)
    task_model.save(tmp_path / "site.safetensors")
    again = mamlkit.load(tmp_path / "site.safetensors").predict(encode(rows[6:])).values[:, 0]
    assert torch.equal(again, values)
    # Adapting helps on this new site: query error in the target's units, 10 steps against none.
    truth = torch.tensor([float(r[3]) for r in rows[6:]])
    before = learner.adapt(encode(rows[:6]), [r[3] for r in rows[:6]], steps=0).predict(encode(rows[6:])).values
    err_after, err_before = (values - truth).abs().mean(), (before[:, 0] - truth).abs().mean()
    assert err_after < 0.5 * err_before, (err_after, err_before)
    # A target column in the query file is ignored.
    write_csv(folder / "q_y.csv", ["x", "colour", "y"], [r[1:] for r in rows[6:]])
    code, out, _ = cli("adapt", csv_runs["reg"], "--support", folder / "support.csv", "--query", folder / "q_y.csv")
    assert code == 0 and [float(r["prediction"]) for r in csv.DictReader(out.splitlines())] == \
        [r["prediction"] for r in got]


def test_csv_fill_mean_uses_the_stored_meta_train_mean(csv_runs, new_site):
    _, rows = new_site
    learner = mamlkit.load(csv_runs["reg"])
    task_model = learner.adapt([{"x": r[1], "colour": r[2]} for r in rows[:6]], [r[3] for r in rows[:6]])
    mean_x = learner.model_spec["mean"][0]
    filled = task_model.predict([{"x": "NA", "colour": "red"}, {"x": mean_x, "colour": "red"}]).values
    assert filled[0].item() == filled[1].item()


def test_csv_classification_predicts_class_names(csv_runs, cli, tmp_path):
    sup = write_csv(tmp_path / "s.csv", ["x", "group", "label"], [[0.1, "a", "low"], [0.9, "b", "high"],
                                                                 [0.2, "b", "low"]])
    q = write_csv(tmp_path / "q.csv", ["x", "group"], [[0.0, "a"], [1.0, "b"]])
    code, out, err = cli("adapt", csv_runs["cls"], "--support", sup, "--query", q)
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    assert list(rows[0]) == ["row", "prediction", "p[high]", "p[low]"]
    assert all(r["prediction"] in ("high", "low") for r in rows)
    assert all(float(r["p[high]"]) + float(r["p[low]"]) == pytest.approx(1, abs=1e-5) for r in rows)
    learner = mamlkit.load(csv_runs["cls"])
    pred = learner.adapt([{"x": "0.1", "group": "a"}, {"x": "0.9", "group": "b"}, {"x": "0.2", "group": "b"}],
                         ["low", "high", "low"]).predict([{"x": 0.0, "group": "a"}, {"x": 1.0, "group": "b"}])
    assert [float(r["p[high]"]) for r in rows] == pytest.approx(pred.probs[:, 0].tolist(), abs=1e-6)
    # A support set of one class is fine here: the classes are the meta-training's.
    one = learner.adapt([{"x": "0.1", "group": "a"}], ["low"]).predict([{"x": 0.0, "group": "a"}])
    assert one.probs.shape == (1, 2)


@pytest.mark.parametrize("run, support, query, message", [
    ("reg", [["x", "colour", "y"], ["0.1", "red", "3"]], [["x"], ["0.2"]],
     "lacks the feature column(s) colour; this model needs the columns x, colour"),
    ("reg", [["x", "colour"], ["0.1", "red"]], [["x", "colour"], ["0.2", "red"]],
     "has no target column 'y'"),
    ("reg", [["x", "colour", "y"], ["0.1", "blue", "3"]], [["x", "colour"], ["0.2", "red"]],
     "categories not seen in meta-training: column 'colour' has 'blue' (line(s) 2); it knows green, red"),
    ("reg", [["x", "colour", "y"], ["0.1", "red", "lots"]], [["x", "colour"], ["0.2", "red"]],
     "the regression target is not a number on line(s) 2 ('lots')"),
    ("reg", [["x", "colour", "y"], ["0.1", "red", ""]], [["x", "colour"], ["0.2", "red"]],
     "the target is missing on line(s) 2"),
    ("reg", [["x", "colour", "y"], ["0.1", "red", "3"]], [["x", "colour"], ["warm", "red"]],
     "line 2 column 'x' is 'warm': not a number"),
    ("cls", [["x", "group", "label"], ["0.1", "a", "low"]], [["x", "group"], ["", "a"], ["0.3", "b"]],
     "1 row(s) have missing values (line(s) 2; columns x)"),
    ("cls", [["x", "group", "label"], ["0.1", "a", "medium"]], [["x", "group"], ["0.3", "b"]],
     "target value(s) 'medium' are not classes of this model; its classes are high, low"),
    ("cls", [["x", "group", "label"], ["0.1", "a"]], [["x", "group"], ["0.3", "b"]],
     "line 2 has 2 fields, the header 3"),
])
def test_csv_bad_input_exits_2(csv_runs, cli, tmp_path, run, support, query, message):
    s = write_csv(tmp_path / "s.csv", support[0], support[1:])
    q = write_csv(tmp_path / "q.csv", query[0], query[1:])
    code, _, err = cli("adapt", csv_runs[run], "--support", s, "--query", q)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_csv_missing_files_and_reset_head_exit_2(csv_runs, new_site, cli):
    folder, _ = new_site
    code, _, err = cli("adapt", csv_runs["reg"], "--support", folder / "nope.csv", "--query", folder / "query.csv")
    assert code == 2 and "CSV file not found" in err
    code, _, err = cli("adapt", csv_runs["cls"], "--support", folder / "support.csv", "--query", folder / "query.csv")
    assert code == 2 and "has no target column 'label'" in err
    s = write_csv(folder / "s.csv", ["x", "group", "label"], [["0.1", "a", "low"], ["0.2", "b", "high"]])
    code, _, err = cli("adapt", csv_runs["cls"], "--support", s, "--query", s, "--reset-head")
    assert code == 2 and "--reset-head does not apply" in err


def test_api_bad_inputs_raise_user_errors(text_ckpt, csv_runs):
    text_learner, table = mamlkit.load(text_ckpt["frozen"]), mamlkit.load(csv_runs["cls"])
    with pytest.raises(mamlkit.UserError, match="pass a tensor or a list of strings, not a str"):
        text_learner.adapt("what is my balance", ["balance"])
    with pytest.raises(mamlkit.UserError, match=r"item\(s\) \[1\] are not"):
        text_learner.adapt(["what is my balance", "  "], ["a", "b"])
    with pytest.raises(mamlkit.UserError, match="3 support examples but 2 labels"):
        text_learner.adapt(["a b", "c d", "e f"], ["x", "y"])
    with pytest.raises(mamlkit.UserError, match=r"missing values \(row\(s\) 2; columns x\)"):
        table.adapt([{"x": 1, "group": "a"}, {"x": None, "group": "b"}], ["low", "high"])
    with pytest.raises(mamlkit.UserError, match=r"class ids must be in \[0, 2\)"):
        table.adapt([{"x": 1, "group": "a"}], torch.tensor([2]))
