"""Exact or refused: ops that cannot give a second derivative, activation checkpointing, random ops, and auto's
check of each candidate against the loop. Float64, against the plain autograd reference of the model zoo
(tests/test_model_zoo.py) or the loop."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from test_model_zoo import INNER_LR, STEPS, meta_grad, reference, rel_error
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

import mamlkit
from mamlkit.base.errors import UserError
from mamlkit.exec import strategies, tuning
from mamlkit.exec.exactness import DifferentiationError
from mamlkit.tasks import TaskBatch

STRATEGIES = ["auto", "vmap", "loop", "threads"]
TOL = 1e-10


# --- the models --------------------------------------------------------------------------------------------


def _tanh_backward(ctx, g):
    x, = ctx.saved_tensors
    return g * (1 - torch.tanh(x) ** 2)


class LegacyTanh(torch.autograd.Function):
    """tanh with a once-differentiable backward, written the legacy way (ctx in forward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    backward = staticmethod(once_differentiable(_tanh_backward))


class FuncTanh(torch.autograd.Function):
    """The same, torch.func style (setup_context, a generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    backward = staticmethod(once_differentiable(_tanh_backward))


class TwiceTanh(FuncTanh):
    """The same function with a backward made of differentiable ops: exact at second order."""

    backward = staticmethod(_tanh_backward)


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def custom(fn):
    return lambda: nn.Sequential(nn.Linear(3, 6), Act(fn), nn.Linear(6, 1))


class Cdist(nn.Module):
    """Distances to learned prototypes (torch.cdist: its backward has no derivative)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.prototypes = nn.Parameter(torch.randn(5, 4))
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(torch.cdist(self.embed(x), self.prototypes))


class Bag(nn.Module):
    """nn.EmbeddingBag (its backward has no derivative) into a linear head."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode="mean")
        self.head = nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(torch.tanh(self.bag(ids)))


class Checkpointed(nn.Module):
    """A middle layer under torch.utils.checkpoint (re-entrant or not)."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 1)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(checkpoint(lambda t: torch.tanh(self.mid(t)), h, use_reentrant=self.reentrant))


class CheckpointedAttention(nn.Module):
    """nn.TransformerEncoderLayer under non-re-entrant activation checkpointing."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):  # [B, L, 3] -> [B, 1]
        return self.head(checkpoint(self.layer, self.embed(x), use_reentrant=False).mean(1))


def checkpointed_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    backbone = transformers.LlamaModel(config)
    backbone.gradient_checkpointing_enable()
    backbone.train()
    assert backbone.gradient_checkpointing
    return mamlkit.models.hf_classifier(backbone, out_features=1, pooling="last")


def _vectors(n):
    return torch.randn(n, 3)


def _sequences(n):
    return torch.randn(n, 4, 3)


def _ids(n):
    return torch.randint(0, 7, (n, 5))


def make(build, inputs, seed=0, tasks=2, shots=4):
    """A float64 model and a regression task batch of ``tasks`` tasks."""
    torch.manual_seed(seed)
    model = build().double()
    xs = [inputs(shots) for _ in range(2 * tasks)]
    xs = [x.double() if x.is_floating_point() else x for x in xs]
    ys = [torch.randn(shots, 1, dtype=torch.float64) for _ in range(2 * tasks)]
    return model, TaskBatch(torch.stack(xs[:tasks]), torch.stack(ys[:tasks]), torch.stack(xs[tasks:]),
                            torch.stack(ys[tasks:]))


# --- ops that cannot give a second derivative: one mamlkit error, never a number ----------------------------


REFUSED = {  # name: (build, inputs, what the error names)
    "once-differentiable-legacy": (custom(LegacyTanh), _vectors, r"LegacyTanh \(in module '1' \(Act\)\)"),
    "once-differentiable-setup-context": (custom(FuncTanh), _vectors, r"FuncTanh \(in module '1' \(Act\)\)"),
    "cdist": (Cdist, _vectors, r"aten::_cdist_backward, the backward of the cdist op in Cdist"),
    "embedding-bag": (Bag, _ids, r"aten::_embedding_bag_backward, the backward of the embedding_bag op in "
                                 r"module 'bag' \(EmbeddingBag\)"),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(REFUSED))
def test_second_order_through_an_op_without_a_second_derivative_is_refused(name, strategy):
    build, inputs, names = REFUSED[name]
    model, batch = make(build, inputs)
    with pytest.raises(DifferentiationError, match=names) as caught:
        meta_grad(model, batch, "mse", False, strategy)
    assert "first_order=True" in str(caught.value) and "--algo fomaml" in str(caught.value)
    assert isinstance(caught.value, UserError)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(REFUSED))
def test_first_order_through_the_same_ops_is_exact(name, strategy):
    build, inputs, _ = REFUSED[name]
    model, batch = make(build, inputs)
    want = reference(model, batch, "mse", first_order=True)
    if name == "once-differentiable-legacy" and strategy == "vmap":
        # torch.func runs only autograd.Functions with setup_context: vmap says so, auto runs the loop
        with pytest.raises(UserError, match="strategy vmap cannot run this model.*setup_context"):
            meta_grad(model, batch, "mse", True, strategy)
        return
    assert rel_error(meta_grad(model, batch, "mse", True, strategy), want) < TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_twice_differentiable_custom_function_is_not_refused(strategy):
    """The check looks at what the graph holds, not at custom Functions as such: this one is exact."""
    model, batch = make(custom(TwiceTanh), _vectors)
    want = reference(model, batch, "mse", first_order=False)
    assert rel_error(meta_grad(model, batch, "mse", False, strategy), want) < TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_once_differentiable_function_outside_the_adapted_path_is_not_refused(strategy):
    """Only the head adapts (ANIL): the inner gradient never runs the function's backward, so the meta-gradient
    needs no second derivative of it and is exact."""
    model, batch = make(custom(FuncTanh), _vectors)
    head = lambda name: name.startswith("2.")  # noqa: E731
    want = reference(model, batch, "mse", first_order=False, adapt=head)
    assert rel_error(meta_grad(model, batch, "mse", False, strategy, adapt=head), want) < TOL


def test_the_refused_meta_gradient_was_wrong():
    """What the refusal prevents: the once-differentiable tanh's meta-gradient, taken the way threads and
    torch.func take it (torch.autograd.grad with respect to the parameters), misses the second-order terms."""
    model, batch = make(custom(FuncTanh), _vectors)
    pruned = reference(model, batch, "mse", first_order=False)  # no error: the error node is pruned
    exact = dict(model.named_parameters())
    twice = custom(TwiceTanh)().double()
    twice.load_state_dict({k: v.detach() for k, v in exact.items()})
    assert rel_error(pruned, reference(twice, batch, "mse", first_order=False)) > 0.1  # 14% off


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reentrant_checkpointing_is_refused_with_the_form_that_works(strategy, order):
    model, batch = make(lambda: Checkpointed(reentrant=True), _vectors)
    with pytest.raises(DifferentiationError, match=r"use_reentrant=True \(in Checkpointed\).*use_reentrant=False"):
        meta_grad(model, batch, "mse", order == "first", strategy)


# --- activation checkpointing (non-re-entrant) is exact ---------------------------------------------------


CHECKPOINTED = {
    "checkpointed-mlp": (lambda: Checkpointed(reentrant=False), _vectors),
    "checkpointed-attention": (CheckpointedAttention, _sequences),
    "checkpointed-llama": (checkpointed_llama, _ids),
}


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_activation_checkpointing_is_exact_or_refused_by_vmap(name, strategy, order):
    model, batch = make(*CHECKPOINTED[name])
    if strategy == "vmap":  # torch.func refuses checkpointing (its saved-tensor hooks); vmap says so and why
        with pytest.raises(UserError, match=r"strategy vmap cannot run this model \(RuntimeError: "):
            meta_grad(model, batch, "mse", order == "first", strategy)
        return
    want = reference(model, batch, "mse", first_order=order == "first")
    assert rel_error(meta_grad(model, batch, "mse", order == "first", strategy), want) < TOL


@pytest.mark.parametrize("strategy", ["loop", "threads"])
def test_the_callers_backward_of_a_checkpointed_attention_meta_loss_is_exact(strategy):
    """meta_loss returns the loss and the caller runs the backward, where the checkpoint recomputes attention."""
    model, batch = make(CheckpointedAttention, _sequences)
    want = reference(model, batch, "mse", first_order=False)
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, loss_fn="mse", strategy=strategy)
    model.zero_grad()
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    assert rel_error({k: p.grad for k, p in model.named_parameters()}, want) < TOL


def test_auto_runs_checkpointed_attention_where_vmap_cannot():
    model, batch = make(CheckpointedAttention, _sequences)
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, loss_fn="mse")
    said = []
    chosen = learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    assert chosen.name in ("loop", "threads")
    assert any("vmap unavailable" in s and "saved tensor hooks" in s for s in said), said


# --- random ops: the same seed gives the same meta-gradient, or the strategy refuses ---------------------


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, training=self.training))


class RecurrentDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class AttentionDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


class Noise(nn.Module):
    """Gaussian noise injected in the forward with torch.randn_like (no dropout anywhere)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + 0.1 * torch.randn_like(h))


RANDOM = {  # name: (build, inputs, the random op threads names)
    "functional-dropout": (FunctionalDropout, _vectors, "bernoulli_"),
    "lstm-dropout": (RecurrentDropout, _sequences, "bernoulli_"),
    "attention-dropout": (AttentionDropout, _sequences, "bernoulli_"),
    "randn-in-forward": (Noise, _vectors, "randn_like"),
}


def seeded_meta_grad(model, batch, strategy, order, seed=3):
    torch.manual_seed(seed)
    return meta_grad(model, batch, "mse", order == "first", strategy)


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(RANDOM))
def test_random_ops_give_one_meta_gradient_per_seed_or_are_refused(name, strategy, order, monkeypatch):
    build, inputs, op = RANDOM[name]
    monkeypatch.setattr(tuning.threads, "cores", lambda: 2)  # auto would time threads here: it must not
    monkeypatch.setattr(tuning.threads, "_task_workers", 2)
    model, batch = make(build, inputs, tasks=3)
    model.train()
    if strategy == "threads":
        with pytest.raises(tuning.StrategyError, match=f"strategy threads cannot run this model reproducibly.*{op}"):
            seeded_meta_grad(model, batch, strategy, order)
        return
    first = seeded_meta_grad(model, batch, strategy, order)
    again = seeded_meta_grad(model, batch, strategy, order)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = seeded_meta_grad(model, batch, strategy, order, seed=4)
    assert any(not torch.equal(other[k], first[k]) for k in first)  # the draws matter: another seed, another one
    if name == "randn-in-forward":
        return  # it draws in evaluation mode too
    model.eval()  # no draws: the loop's meta-gradient
    assert rel_error(meta_grad(model, batch, "mse", order == "first", strategy),
                     meta_grad(model, batch, "mse", order == "first", "loop")) < TOL


def test_auto_never_times_threads_for_a_model_that_draws(monkeypatch):
    monkeypatch.setattr(tuning.threads, "cores", lambda: 2)
    monkeypatch.setattr(tuning.threads, "_task_workers", 2)
    model, batch = make(FunctionalDropout, _vectors, tasks=4)
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, loss_fn="mse")
    said = []
    chosen = learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    assert chosen.name == "vmap"  # the first candidate that runs, untimed: the choice does not follow the load
    assert any("draws random numbers (aten::bernoulli_)" in s and "without timing" in s for s in said), said
    assert not any("strategy timing" in s for s in said)


def test_inactive_dropout_costs_nothing(monkeypatch):
    """An eval-mode model (what from_pretrained returns) whose nn.Dropout draws nothing runs on threads, with
    the loop's numbers, and auto times threads for it."""
    monkeypatch.setattr(tuning.threads, "cores", lambda: 2)
    monkeypatch.setattr(tuning.threads, "_task_workers", 2)
    build = lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))  # noqa: E731
    model, batch = make(build, _vectors, tasks=4)
    model.eval()
    want = meta_grad(model, batch, "mse", False, "loop")
    got = meta_grad(model, batch, "mse", False, "threads")
    assert all(torch.equal(got[k], want[k]) for k in want)
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, loss_fn="mse")
    said = []
    learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    assert any("strategy timing" in s and "threads " in s for s in said), said
    model.train()  # now it draws: threads refuses it on the next call
    with pytest.raises(tuning.StrategyError, match="bernoulli_"):
        meta_grad(model, batch, "mse", False, "threads")


# --- auto checks every candidate against the loop, and says why it refuses -------------------------------


def test_auto_drops_a_candidate_whose_meta_gradient_is_not_the_loops(monkeypatch):
    model, batch = make(lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), _vectors, tasks=4)
    want = meta_grad(model, batch, "mse", False, "loop")
    run = strategies._run

    def off_under_vmap(fn, batch, vectorize):
        loss, pred = run(fn, batch, vectorize)
        return (loss * 1.001 if vectorize else loss), pred

    monkeypatch.setattr(strategies, "_run", off_under_vmap)
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, loss_fn="mse")
    said = []
    chosen = learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    assert chosen.name == "loop"
    assert any("strategy vmap dropped: its meta-gradient is 0.001 off the loop's" in s and "float64 is 1e-09" in s
               for s in said), said
    for p in model.parameters():
        p.grad = None
    learner.meta_backward(batch)
    assert rel_error({k: p.grad for k, p in model.named_parameters()}, want) == 0


def test_autos_refusal_names_every_candidate_and_its_reason():
    factories = {}
    exec(FACTORY, factories)  # the models the command-line tests below train: one source for both
    model, batch = make(factories["Broken"], lambda n: torch.randn(n, 1))
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, loss_fn="mse")
    with pytest.raises(UserError, match="no execution strategy could run this model") as caught:
        learner.meta_backward(batch)
    message = str(caught.value)
    assert "vmap: ValueError: no transforms" in message and "loop: RuntimeError: no plain call" in message
    assert "see the log" not in message
    assert isinstance(caught.value.__cause__, RuntimeError) and "no plain call" in str(caught.value.__cause__)


# --- the same from the command line: exit 2 and the message, never a traceback or a number -------------------

FACTORY = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class Once(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(Tanh.apply(self.a(x)))


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, training=self.training))


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 1)

    def forward(self, x):
        if torch._C._functorch.maybe_current_level() is not None:
            raise ValueError("no transforms")
        if torch.is_grad_enabled():
            raise RuntimeError("no plain call")
        return self.a(x)
"""

CLI = ["--iterations", "2", "--meta-batch", "2", "--val-tasks", "0", "--eval-tasks", "2", "--hidden-sizes", "8",
       "--no-compare-pretrained", "--no-progress", "--no-tensorboard"]


@pytest.mark.parametrize("factory, args, message", [
    ("Once", ["--strategy", "vmap"], r"Tanh \(in Once\).*first_order=True in Python, --algo fomaml in the CLI"),
    ("Once", ["--strategy", "auto"], r"Tanh \(in Once\).*--algo fomaml"),
    ("Dropped", ["--strategy", "threads"], r"strategy threads cannot run this model reproducibly.*bernoulli_"),
    ("Broken", ["--strategy", "auto"], r"no execution strategy could run this model\..* vmap: ValueError: no "
                                       r"transforms; loop: RuntimeError: no plain call"),
])
def test_the_cli_exits_2_with_the_reason(cli, tmp_path, monkeypatch, factory, args, message):
    (tmp_path / "exactnets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = cli("train", "sinusoid", "--model", f"exactnets:{factory}", "--out-dir", tmp_path / "runs",
                       *CLI, *args)
    assert code == 2 and "Traceback" not in err
    assert re.search(message, " ".join(err.split())), err
