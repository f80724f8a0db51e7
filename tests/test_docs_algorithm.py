"""docs/DEVELOPING.md's "How to add an algorithm" is a worked example that runs: its code blocks define,
register and check a new algorithm (an identity with MAML in float64)."""

import re
from pathlib import Path

import pytest
import torch

from mamlkit.algorithms import ALGORITHMS, build_learner
from mamlkit.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEVELOPING.md"


def section_code(title: str) -> list[str]:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], re.S)


@pytest.fixture
def registry():
    saved = dict(ALGORITHMS)
    yield
    ALGORITHMS.clear()
    ALGORITHMS.update(saved)


def test_how_to_add_an_algorithm_runs(registry):
    blocks = section_code("How to add an algorithm")
    assert len(blocks) == 2
    namespace: dict = {"__name__": "learned_rate"}
    for block in blocks:  # the second block asserts the identity with MAML
        exec(compile(block, str(DOC), "exec"), namespace)
    # registered under its name, and built from a config like every other algorithm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    learner = build_learner("learned-rate", model, TrainConfig(strategy="vmap", dtype="float64"))
    assert learner.name == "learned-rate" and "inner_lr" in learner.meta_parameters()
    assert learner.executor.strategy.name == "vmap"


TINY = ["--iterations", "3", "--eval-tasks", "4", "--eval-query", "5", "--eval-shots", "5", "--eval-steps", "0", "1",
        "--val-tasks", "0", "--hidden-sizes", "8", "--no-compare-pretrained", "--no-progress", "--no-tensorboard",
        "--threads", "1", "--strategy", "loop"]


def test_its_rule_is_printed_by_the_report_and_by_adapt(registry, cli, tmp_path):
    """The worked example's ``describe()`` is what eval.md and ``mamlkit adapt`` print about its rule."""
    namespace: dict = {"__name__": "learned_rate"}
    exec(compile(section_code("How to add an algorithm")[0], str(DOC), "exec"), namespace)
    code, _, err = cli("train", "sinusoid", "--algo", "learned-rate", "--out-dir", tmp_path, "--run-name", "lr",
                       *TINY)
    assert code == 0, err
    from mamlkit.loop import train

    learner = train.load_trainer(tmp_path / "lr", resume=False).learner
    said = learner.describe()
    rate = float(learner.meta_parameters()["inner_lr"].detach())
    assert said == f"SGD at a meta-learned α={rate:.4g}" and rate != 0.001  # meta-learned: it moved from its start
    assert f"learned-rate: {said}" in (tmp_path / "lr" / "eval.md").read_text()
    (tmp_path / "s.csv").write_text("x,y\n-2,-3\n0,1\n1,3\n")
    (tmp_path / "q.csv").write_text("x\n-1\n3\n")
    code, _, err = cli("adapt", tmp_path / "lr", "--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv",
                       "--steps", "2")
    assert code == 0, err
    assert f"(learned-rate): 2 steps of {said} on 3 support points" in err
