"""docs/DEVELOPING.md's "How to add an algorithm" is a worked example that runs: its code blocks define,
register and check a new algorithm (an identity with MAML in float64)."""

import re
from pathlib import Path

import pytest
import torch

from mamlkit import cli
from mamlkit.algorithms import ALGORITHMS, build_learner
from mamlkit.base.options import unregister_options
from mamlkit.config import ConfigError, TrainConfig

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
    unregister_options("algo", "learned-rate")


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


def test_the_worked_algorithm_owns_its_option(registry, capsys):
    """Its one option, declared in its file and registered on its line, is a flag with its help, sets the rate's
    initial value, and is refused for another algorithm; another algorithm's flag is refused for it."""
    namespace: dict = {"__name__": "learned_rate"}
    exec(compile(section_code("How to add an algorithm")[0], str(DOC), "exec"), namespace)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--rate-init X|none learned-rate: the learned rate's initial value (none: --inner-lr)" in text
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    for given, rate in ((0.25, 0.25), (None, 0.01)):
        cfg = TrainConfig(algo="learned-rate", rate_init=given, strategy="loop", dtype="float64")
        learner = build_learner("learned-rate", model, cfg)
        assert learner.meta_parameters()["inner_lr"].item() == rate
    with pytest.raises(ConfigError, match="--rate-init has no effect on --algo maml"):
        TrainConfig(algo="maml", rate_init=0.25)
    with pytest.raises(ConfigError, match="--first-order has no effect on --algo learned-rate"):
        TrainConfig(algo="learned-rate", first_order=True)


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
