"""Task families plug in through one protocol (mamlkit/tasks/family.py): the worked example of
docs/DEVELOPING.md runs as written, a family without an input spec is refused by `mamlkit adapt` with a
clear message, `mamlkit data` lists the families' datasets, and no code outside a family's file asks
which family a config names."""

from __future__ import annotations

import ast
import csv
import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import mamlkit
from mamlkit import tasks
from mamlkit.config import TrainConfig
from mamlkit.tasks import DataCommand, TaskFamily, register_task_family

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "DEVELOPING.md"


def section_blocks(heading: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block in the DEVELOPING.md section under ``heading``."""
    text = DOC.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end if end > 0 else None], re.S)


@pytest.fixture
def registry():
    """Families registered by a test are removed afterwards."""
    before = dict(tasks.TASK_FAMILIES)
    yield
    tasks.TASK_FAMILIES.clear()
    tasks.TASK_FAMILIES.update(before)
    sys.modules.pop("mamlkit.tasks.lines", None)
    sys.modules.pop("mamlkit.tasks.wedges", None)


def test_developing_example_adds_a_family_in_one_file_and_a_line(registry, cli, tmp_path, monkeypatch):
    (_, module_code), (_, registry_line), (lang, commands) = section_blocks("## How to add a task family")[:3]
    assert lang == "sh" and registry_line.strip().startswith("register_task_family(")
    module = types.ModuleType("mamlkit.tasks.lines")  # the file mamlkit/tasks/lines.py
    sys.modules["mamlkit.tasks.lines"] = module
    exec(compile(module_code, "mamlkit/tasks/lines.py", "exec"), module.__dict__)
    exec(registry_line, vars(tasks))  # the line in mamlkit/tasks/__init__.py
    assert set(tasks.get_family("lines").__dict__) >= {"build", "model_spec", "input_spec", "report"}

    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in commands.strip().splitlines():
        if line.startswith("mamlkit "):
            code, out, err = cli(*shlex.split(line)[1:], "--threads", "1") if " train " in f" {line} " \
                else cli(*shlex.split(line)[1:])
            assert code == 0, err
            outputs.append(out)
        else:
            subprocess.run(["bash", "-c", line], check=True, cwd=tmp_path)

    report = json.loads((tmp_path / "runs" / "lines" / "eval.json").read_text())
    assert report["task"] == "lines" and set(report["mse"]) == {"maml"}
    mse = report["mse"]["maml"]["5"]
    assert mse["1"]["mean"] < mse["0"]["mean"]  # one meta-learned step helps on unseen lines
    assert mse["10"]["mean"] < 0.5 * mse["0"]["mean"]
    table = (tmp_path / "runs" / "lines" / "eval.md").read_text()
    assert table.startswith("Random lines: query MSE")
    rows = [r for r in table.splitlines() if r.startswith("| 5 |")]
    assert len(rows) == 4 and all(r.endswith("| — |") for r in rows)  # the sinusoid paper's numbers are not its
    rows = list(csv.DictReader(outputs[-1].splitlines()))
    assert [r["x0"] for r in rows] == ["-1.0", "3.0"]
    # adapted on points of y = 2x + 1: the predictions move towards the line
    learner = mamlkit.load(tmp_path / "runs" / "lines")
    before = learner.adapt(torch.zeros(0, 1), torch.zeros(0, 1), steps=0).predict(torch.tensor([[-1.0], [3.0]]))
    after = torch.tensor([float(r["prediction"]) for r in rows])
    truth = torch.tensor([-1.0, 7.0])
    assert (after - truth).abs().sum() < (before.values.reshape(-1) - truth).abs().sum()


def test_developing_example_of_a_classification_family_with_vector_inputs_adapts(registry, cli, tmp_path,
                                                                                  monkeypatch):
    (_, module_code), (_, registry_line), (lang, commands) = section_blocks(
        "### A classification family with vector inputs")
    assert lang == "sh" and registry_line.strip().startswith("register_task_family(")
    module = types.ModuleType("mamlkit.tasks.wedges")  # the file mamlkit/tasks/wedges.py
    sys.modules["mamlkit.tasks.wedges"] = module
    exec(compile(module_code, "mamlkit/tasks/wedges.py", "exec"), module.__dict__)
    exec(registry_line, vars(tasks))
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in commands.strip().splitlines():
        if line.startswith("mamlkit "):
            extra = ("--threads", "1") if " train " in f" {line} " else ()
            code, out, err = cli(*shlex.split(line)[1:], *extra)
            assert code == 0 and "Traceback" not in err, err
            outputs.append(out)
        else:
            subprocess.run(["bash", "-c", line], check=True, cwd=tmp_path)
    report = json.loads((tmp_path / "runs" / "wedges" / "eval.json").read_text())
    assert report["task"] == "wedges"
    table = (tmp_path / "runs" / "wedges" / "eval.md").read_text()
    assert table.startswith("Random wedges: query accuracy")
    rows = list(csv.DictReader(outputs[-1].splitlines()))
    assert [r["x0"] for r in rows] == ["0.5", "-2.0"] and [r["prediction"] for r in rows] == ["north", "south"]
    assert all(float(r[f"p[{r['prediction']}]"]) > 0.5 for r in rows)
    # the command's numbers are the Python API's: labels numbered in sorted order
    support = list(csv.DictReader(open(tmp_path / "support.csv")))
    x = torch.tensor([[float(r["x0"]), float(r["x1"])] for r in support], dtype=torch.float64)
    pred = mamlkit.load(tmp_path / "runs" / "wedges").adapt(x, [r["label"] for r in support]).predict(
        torch.tensor([[0.5, 2.5], [-2.0, -2.5]], dtype=torch.float64))
    torch.testing.assert_close(torch.tensor([[float(r["p[north]"]), float(r["p[south]"])] for r in rows]),
                               pred.probs.float(), atol=1e-6, rtol=0)


def _train_tiny(task: str, tmp_path: Path) -> Path:
    from mamlkit.loop import train

    cfg = TrainConfig(task=task, iterations=2, meta_batch=2, k_shot=3, k_query=3, val_tasks=0, progress=False,
                      tensorboard=False, strategy="loop", out_dir=str(tmp_path), run_name=task)
    trainer = train.fit(train.new_trainer(cfg, train.run_dir_for(cfg)))
    return trainer.run_dir


def test_family_without_input_spec_is_refused_by_adapt_not_read_as_regression(registry, cli, tmp_path):
    sinusoid = tasks.get_family("sinusoid")
    register_task_family(TaskFamily(name="tensors_only", build=sinusoid.build, model_spec=sinusoid.model_spec))
    run = _train_tiny("tensors_only", tmp_path)
    (tmp_path / "s.csv").write_text("x,y\n0,1\n1,2\n")
    (tmp_path / "q.csv").write_text("x\n0.5\n")
    code, out, err = cli("adapt", run, "--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv")
    assert code == 2 and "declares no raw input format" in err and "tensors" in err and "prediction" not in out
    learner = mamlkit.load(run)  # Python callers still adapt with tensors
    assert learner.input is None
    values = learner.adapt(torch.zeros(2, 1), torch.ones(2, 1), steps=1).predict(torch.zeros(1, 1)).values
    assert values.shape == (1, 1) and torch.isfinite(values).all()
    with pytest.raises(mamlkit.UserError, match="declares no raw input format"):
        learner.adapt([[0.0]], torch.ones(1, 1))


def test_data_command_lists_what_the_families_declare(registry, cli):
    from mamlkit.cli import build_parser

    def choices():
        sub = next(a for a in build_parser()._actions if a.dest == "command")
        return set(next(a for a in sub.choices["data"]._actions if a.dest == "dataset").choices)

    assert choices() == {"omniglot", "miniimagenet", "clinc150"}
    calls = []
    register_task_family(TaskFamily(name="toy", build=None, model_spec=None,
                                    data=DataCommand("toyset", lambda *a: calls.append(a) or "toyset: ready")))
    assert "toyset" in choices()
    code, out, _ = cli("data", "toyset", "--data-root", "somewhere", "--no-download")
    assert code == 0 and out == "toyset: ready\n" and calls == [("somewhere", False, False)]


def _task_branches(source: str, where: str) -> list[str]:
    """Comparisons of a ``.task`` attribute with string constants (``cfg.task == "csv"``, ``task in (...)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            strings = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or
                          isinstance(s, (ast.Tuple, ast.List, ast.Set)) and
                          any(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)
                          for s in sides)
            if strings and any(isinstance(s, ast.Attribute) and s.attr == "task" for s in sides):
                found.append(f"{where}:{node.lineno}")
    return found


def test_no_code_outside_a_family_asks_which_family_it_is():
    # the check finds what it forbids, and not a comparison with a variable
    probe = 'if cfg.task in ("csv", "clinc"):\n    pass\nok = cfg.task == name\nbad = "csv" != cfg.task\n'
    assert _task_branches(probe, "probe") == ["probe:1", "probe:4"]
    package = ROOT / "mamlkit"
    branches = [b for p in sorted(package.rglob("*.py")) if package / "tasks" not in p.parents
                for b in _task_branches(p.read_text(), str(p.relative_to(ROOT)))]
    assert not branches, f"declare it in the task family instead (mamlkit/tasks/family.py): {branches}"
