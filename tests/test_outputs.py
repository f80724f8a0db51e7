"""Models whose output is not one tensor: a tuple, a dict or a Hugging Face ``ModelOutput``.

The loss takes the tensor the ``output`` selector picks (mamlkit.engine.outputs), inside the per-task
function, so every strategy runs these models and computes the plain model's meta-gradient (float64);
a selector that does not fit is one clear error, in Python and from the CLI; ``--output`` trains a
``ModelOutput`` factory, which the command finds in the current folder; and the README's example model
trains every parameter, attention's queries and keys included.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
from conftest import ROOT
from torch import nn

import mamlkit
from mamlkit.tasks import Sinusoid, task_generator

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

STRATEGIES = ["vmap", "loop", "threads", "auto"]


class Net(nn.Module):
    """The same MLP, returning its prediction as a tensor or wrapped in one of the output types."""

    def __init__(self, wrap: str = "tensor"):
        super().__init__()
        self.wrap = wrap
        self.body = nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 1))

    def forward(self, x):
        y = self.body(x)
        if self.wrap == "tuple":  # the prediction first, then something else the loss must not take
            return y, torch.tanh(y) * 3
        if self.wrap == "dict":
            return {"logits": y, "features": torch.tanh(y)}
        if self.wrap == "model_output":
            return SequenceClassifierOutput(logits=y, hidden_states=(torch.tanh(y),))
        if self.wrap == "one_tuple":
            return (y,)
        return y


def batch():
    return Sinusoid().sample(4, task_generator(0, "test", 0)).to(dtype=torch.float64)


def meta_grad(wrap: str, output=None, strategy: str = "loop", first_order: bool = False) -> torch.Tensor:
    torch.manual_seed(0)
    model = Net(wrap).double()
    chosen = {} if output is None else {"output": output}  # the default: no keyword at all
    learner = mamlkit.MAML(model, inner_lr=0.05, inner_steps=2, first_order=first_order, strategy=strategy, **chosen)
    learner.meta_backward(batch())
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# by default: a ModelOutput's and a dict's logits, a one-element tuple's element; chosen: a tuple's index 0, a
# ModelOutput's key and index, a function of a dict
CASES = [("model_output", None), ("dict", None), ("one_tuple", None), ("tuple", 0), ("model_output", "logits"),
         ("model_output", 0), ("dict", lambda out: out["logits"])]


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_output_type_gives_the_plain_models_meta_gradient(strategy, first_order):
    want = meta_grad("tensor", first_order=first_order)
    for wrap, output in CASES:
        got = meta_grad(wrap, output, strategy, first_order)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-12, (wrap, output, err)


def test_the_meta_loss_and_evaluation_and_adaptation_select_the_same_tensor():
    b = batch()
    torch.manual_seed(0)
    plain = mamlkit.MAML(Net().double(), inner_lr=0.05, inner_steps=2, strategy="loop")
    torch.manual_seed(0)
    wrapped = mamlkit.MAML(Net("model_output").double(), inner_lr=0.05, inner_steps=2, strategy="vmap")
    assert torch.allclose(wrapped.meta_loss(b)[0], plain.meta_loss(b)[0], rtol=1e-13, atol=0)
    for a, c in zip(wrapped.adapted_losses(b, 3), plain.adapted_losses(b, 3)):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-15)
    fast = wrapped.adapt(b.support_x[0], b.support_y[0], steps=3)
    ref = plain.adapt(b.support_x[0], b.support_y[0], steps=3)
    assert all(torch.allclose(fast[k], ref[k], rtol=1e-13, atol=1e-15) for k in ref)
    pred = wrapped.predict(fast, b.query_x[0])
    assert isinstance(pred, torch.Tensor) and torch.allclose(pred, plain.predict(ref, b.query_x[0]))


@pytest.mark.slow  # one torch.compile of the meta-gradient
def test_compiled_strategy_selects_too():
    pytest.importorskip("torch._inductor")
    want = meta_grad("tensor")
    try:
        got = meta_grad("model_output", "logits", "compile")
    except Exception as err:  # noqa: BLE001 - no C++ compiler for torch.compile on this machine
        if "compiler" in str(err).lower() or "InvalidCxxCompiler" in type(err).__name__:
            pytest.skip(f"torch.compile unavailable: {err}")
        raise
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-12


@pytest.mark.parametrize("wrap, output, words", [
    ("tuple", None, ["tuple of 2", "Tensor [10, 1]", "output="]),  # two tensors: never guessed
    ("model_output", "logit", ["no 'logit'", "'logits'"]),
    ("tuple", 5, ["output=5", "2 item(s)"]),
    ("tensor", "logits", ["names a key or attribute", "Tensor [10, 1]", "drop output"]),
    ("dict", "features", None),  # a valid key: no error (the check is about fit, not taste)
    ("model_output", lambda out: out.hidden_states, ["selects a tuple", "not a tensor"]),
])
@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_a_selector_that_does_not_fit_is_one_clear_error(wrap, output, words, strategy):
    """Under auto too: the error names the output, not 'no execution strategy could run this model'."""
    from mamlkit.base.errors import UserError

    chosen = {} if output is None else {"output": output}
    learner = mamlkit.MAML(Net(wrap).double(), inner_lr=0.05, strategy=strategy, **chosen)
    if words is None:
        learner.meta_backward(batch())
        return
    with pytest.raises(UserError) as info:  # the CLI prints it and exits with code 2
        learner.meta_backward(batch())
    assert type(info.value).__name__ == "OutputError"
    for w in words:
        assert w in str(info.value), str(info.value)
    assert "strategy" not in str(info.value)


@pytest.mark.parametrize("output", [1.5, "", True, ["logits"]])
def test_a_selector_of_the_wrong_kind_is_refused_at_once(output):
    from mamlkit.engine.outputs import OutputError

    with pytest.raises(OutputError, match="output must be None, a key"):
        mamlkit.MAML(Net().double(), output=output)


# --- the command line --------------------------------------------------------------------------------------

FACTORIES = '''
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class Net(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap
        self.body = nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 1))

    def forward(self, x):
        y = self.body(x)
        return SequenceClassifierOutput(logits=y) if self.wrap == "mo" else (y, torch.tanh(y))


def mo():
    return Net("mo")


def pair():
    return Net("pair")


def plain():
    return nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 1))
'''

FAST = ["--iterations", "3", "--meta-batch", "2", "--no-compare-pretrained", "--eval-tasks", "4", "--val-tasks", "0",
        "--eval-shots", "5", "--eval-steps", "0", "1", "--no-progress", "--no-tensorboard", "--log-every", "1"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A folder holding a factory module, as the current folder, with nothing else putting it on sys.path
    (``python -m pytest`` adds '', the current folder, which the ``mamlkit`` script does not)."""
    name = f"outnets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_cli_output_logits_trains_a_model_output_factory_found_in_the_current_folder(cli, tmp_path, here):
    import json

    from mamlkit import checkpoint

    code, out, err = cli("train", "sinusoid", "--model", f"{here}:mo", "--output", "logits", "--run-name", "mo",
                         "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    assert str(tmp_path) not in sys.path  # the folder was on the path only to import the factory's module
    run = tmp_path / "runs" / "mo"
    _, state = checkpoint.load(run / "checkpoint.safetensors")
    assert state["config"]["output"] == "logits"  # recorded: eval and adapt select the same tensor
    report = json.loads((run / "eval.json").read_text())
    assert report  # the final evaluation ran on the selected tensor
    learner = mamlkit.load(run, model=f"{here}:mo")
    assert learner.meta.output.spec == "logits"
    b = Sinusoid().sample(1, task_generator(0, "test", 0))
    task_model = learner.adapt(b.support_x[0], b.support_y[0])
    values = task_model.predict(b.query_x[0]).values
    assert isinstance(values, torch.Tensor) and values.shape == b.query_y[0].shape
    task_model.save(tmp_path / "task.safetensors")
    again = mamlkit.load(tmp_path / "task.safetensors", model=f"{here}:mo")
    assert again.output == "logits"
    assert torch.allclose(again.predict(b.query_x[0]).values, values, rtol=1e-6, atol=1e-7)
    # `mamlkit eval` and `mamlkit adapt` find the module in the current folder too, and select the same tensor
    del sys.modules[here]
    code, out, err = cli("eval", str(run), "--model", f"{here}:mo", "--eval-tasks", "4", "--overwrite")
    assert code == 0, err
    del sys.modules[here]
    (tmp_path / "s.csv").write_text("x,y\n0.1,0.2\n0.5,0.4\n-1,0.3\n")
    (tmp_path / "q.csv").write_text("x\n0.3\n2\n")
    code, out, err = cli("adapt", str(run), "--support", "s.csv", "--query", "q.csv", "--model", f"{here}:mo")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 3, out  # a header and one prediction per query row


def test_cli_finds_a_factory_module_in_the_current_folder(cli, tmp_path, here):
    code, _, err = cli("train", "sinusoid", "--model", f"{here}:plain", "--run-name", "plain",
                       "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    assert here in sys.modules and str(tmp_path) not in sys.path
    code, _, err = cli("train", "sinusoid", "--model", "no_such_nets_here:plain", "--run-name", "none",
                       "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 2 and "cannot import 'no_such_nets_here'" in err, err


def test_cli_output_index_and_the_errors_of_a_selector(cli, tmp_path, here):
    common = ["--out-dir", str(tmp_path / "runs"), *FAST]
    code, _, err = cli("train", "sinusoid", "--model", f"{here}:pair", "--output", "0", "--run-name", "pair", *common)
    assert code == 0, err
    code, _, err = cli("train", "sinusoid", "--model", f"{here}:pair", "--run-name", "pair2", *common)
    assert code == 2 and "tuple of 2" in err and "--output" in err and "Traceback" not in err, err
    code, _, err = cli("train", "sinusoid", "--model", f"{here}:mo", "--output", "logit", "--run-name", "mo2", *common)
    assert code == 2 and "no 'logit'" in err and "'logits'" in err, err
    code, _, err = cli("train", "sinusoid", "--output", "logits", "--run-name", "mlp", *common)  # mamlkit's own MLP
    assert code == 2 and "drop output" in err, err
    code, _, err = cli("train", "sinusoid", "--output", "a b", "--run-name", "bad", *common)
    assert code == 2 and "output must be a key or attribute name" in err, err


def test_output_flag_and_config_field():
    from mamlkit.config import TrainConfig

    assert TrainConfig().output_spec is None
    assert TrainConfig(output="0").output_spec == 0
    assert TrainConfig(output="-1").output_spec == -1
    assert TrainConfig(output="logits").output_spec == "logits"


# --- the README's own model ------------------------------------------------------------------------------


def readme_nets(tmp_path):
    """The README's ``mynets.py``, imported from a file of its own."""
    import importlib.util

    code = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if b.startswith("# mynets.py"))
    path = tmp_path / "readme_mynets.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("readme_mynets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_parameters(model: nn.Module, output) -> dict[str, torch.Tensor]:
    learner = mamlkit.MAML(model.double(), inner_lr=0.01, inner_steps=1, strategy="loop", output=output)
    learner.meta_backward(batch())
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def test_the_readme_model_trains_every_parameter_attention_included(tmp_path):
    nets = readme_nets(tmp_path)
    torch.manual_seed(0)
    model = nets.TokenBert()
    assert isinstance(model(torch.zeros(3, 1)), transformers.utils.ModelOutput)
    grads = trained_parameters(model, "logits")
    assert any(".attention.self.query." in k for k in grads) and len(grads) > 30
    zero = [k for k, g in grads.items() if g is None or not g.any()]
    assert not zero, f"parameters with no meta-gradient: {zero}"
    # the failure the example avoids: with one token, attention's queries and keys get nothing
    torch.manual_seed(0)
    one = trained_parameters(nets.TokenBert(tokens=1), "logits")
    assert all(not one[k].any() for k in one if ".attention.self.query." in k or ".attention.self.key." in k)
    grads = trained_parameters(nets.wide(hidden=16), None)
    assert all(g.any() for g in grads.values())
