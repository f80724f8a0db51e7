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
