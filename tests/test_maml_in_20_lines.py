"""docs/maml_in_20_lines.md: its code is the mathematics mamlkit.MAML computes, to float64 rounding."""

import re
from pathlib import Path

import pytest
import torch

import mamlkit
from mamlkit.tasks import Sinusoid, task_generator

PAGE = Path(__file__).resolve().parents[1] / "docs" / "maml_in_20_lines.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def _page() -> dict:
    scope: dict = {}
    exec(compile(_blocks()[0], str(PAGE), "exec"), scope)
    return scope


def test_the_function_is_twenty_lines():
    lines = [line for line in _blocks()[0].splitlines() if line.strip()]
    assert len(lines) <= 22, len(lines)


def _problem():
    batch = Sinusoid().sample(5, task_generator(0, "train", 0)).to(dtype=torch.float64)
    torch.manual_seed(0)
    model = mamlkit.models.mlp(1, (16, 16), 1).double()
    return model, batch


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
@pytest.mark.parametrize("first_order", [False, True])
def test_page_equals_maml_in_float64(strategy, first_order):
    model, batch = _problem()
    params = dict(model.named_parameters())
    page = _page()["maml_loss"](model, params, batch, inner_lr=0.05, inner_steps=2, first_order=first_order)
    want = torch.autograd.grad(page, list(params.values()))
    learner = mamlkit.MAML(model, inner_lr=0.05, inner_steps=2, first_order=first_order, strategy=strategy)
    loss, _ = learner.meta_loss(batch)
    got = torch.autograd.grad(loss, list(params.values()))
    torch.testing.assert_close(loss, page, rtol=1e-13, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_first_order_differs_from_second_order():
    """The two gradients the page computes are not the same one: the check above can fail."""
    model, batch = _problem()
    params = dict(model.named_parameters())
    f = _page()["maml_loss"]
    exact = torch.autograd.grad(f(model, params, batch, inner_lr=0.05, inner_steps=2), list(params.values()))
    first = torch.autograd.grad(f(model, params, batch, inner_lr=0.05, inner_steps=2, first_order=True),
                                list(params.values()))
    assert max((a - b).abs().max().item() for a, b in zip(exact, first, strict=True)) > 1e-4


def test_the_meta_step_block_runs():
    model, batch = _problem()
    scope = _page() | {"model": model, "batch": batch}
    before = [p.detach().clone() for p in model.parameters()]
    exec(compile(_blocks()[1], str(PAGE), "exec"), scope)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
