"""Meta-gradients of the engine against finite differences and closed forms (float64)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import finite_difference_grad, flat
from torch import nn

import mamlkit
from mamlkit.tasks import Sinusoid, TaskBatch, task_generator


@pytest.fixture(autouse=True)
def _float64():
    """This module's tests build models in float64; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def sinusoid_batch(tasks=3, k=6, seed=0):
    return Sinusoid(k_support=k, k_query=k).sample(tasks, task_generator(seed, "test", 0)).to(dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_meta_gradient_matches_finite_differences(steps, strategy):
    model = tiny_mlp()
    learner = mamlkit.MAML(model, inner_lr=0.05, inner_steps=steps, loss_fn="mse", strategy=strategy)
    batch = sinusoid_batch()
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    analytic = flat(p.grad for p in model.parameters())
    numeric = finite_difference_grad(lambda: learner.meta_loss(batch)[0], list(model.parameters()))
    assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-8), (analytic - numeric).abs().max()


def _closed_form_one_step(model, batch, alpha):
    """(1/T) Σ_t (I − α∇²L_s(θ)) ∇L_q(θ'_t), with the Hessian from torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = flat(p.detach() for p in model.parameters())

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def loss_at(v, x, y):
        return F.mse_loss(torch.func.functional_call(model, unflat(v), (x,)), y)

    total = torch.zeros_like(theta)
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        g_s = torch.autograd.functional.jacobian(lambda v, x=sx, y=sy: loss_at(v, x, y), theta)
        hess = torch.autograd.functional.hessian(lambda v, x=sx, y=sy: loss_at(v, x, y), theta)
        adapted = theta - alpha * g_s
        g_q = torch.autograd.functional.jacobian(lambda v, x=qx, y=qy: loss_at(v, x, y), adapted)
        total += (torch.eye(theta.numel()) - alpha * hess) @ g_q
    return total / batch.num_tasks, names, unflat


def test_one_step_meta_gradient_closed_form():
    model = tiny_mlp(1)
    alpha = 0.1
    batch = sinusoid_batch(tasks=2, seed=3)
    expected, _, _ = _closed_form_one_step(model, batch, alpha)
    learner = mamlkit.MAML(model, inner_lr=alpha, inner_steps=1, loss_fn="mse")
    learner.meta_loss(batch)[0].backward()
    got = flat(p.grad for p in model.parameters())
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    # The identity term matters: dropping it (a common write-up) gives a different gradient.
    assert not torch.allclose(got, expected - _fomaml_reference(model, batch, alpha), atol=1e-6)


def _fomaml_reference(model, batch, alpha):
    """(1/T) Σ_t ∇L_q(θ'_t): the first-order meta-gradient, computed without the engine."""
    total = None
    for t in range(batch.num_tasks):
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        ls = F.mse_loss(torch.func.functional_call(model, params, (batch.support_x[t],)), batch.support_y[t])
        gs = torch.autograd.grad(ls, list(params.values()))
        adapted = {n: (p - alpha * g).detach().requires_grad_() for (n, p), g in zip(params.items(), gs)}
        lq = F.mse_loss(torch.func.functional_call(model, adapted, (batch.query_x[t],)), batch.query_y[t])
        g = flat(torch.autograd.grad(lq, list(adapted.values())))
        total = g if total is None else total + g
    return total / batch.num_tasks


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_fomaml_gradient_is_query_gradient_at_adapted_params(strategy):
    model = tiny_mlp(2)
    batch = sinusoid_batch(tasks=4, seed=5)
    learner = mamlkit.MAML(model, inner_lr=0.1, inner_steps=1, first_order=True, loss_fn="mse", strategy=strategy)
    learner.meta_loss(batch)[0].backward()
    got = flat(p.grad for p in model.parameters())
    assert torch.allclose(got, _fomaml_reference(model, batch, 0.1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", [0, 2])
def test_vmap_equals_loop_and_chunked_backward_equals_meta_loss(chunk):
    batch = sinusoid_batch(tasks=5, seed=7)
    grads = []
    for strategy in ("vmap", "loop"):
        model = tiny_mlp(3)
        learner = mamlkit.MAML(model, inner_lr=0.05, inner_steps=2, loss_fn="mse", strategy=strategy,
                               chunk_size=chunk or None)
        learner.meta_backward(batch)
        grads.append(flat(p.grad for p in model.parameters()))
        model.zero_grad()
        learner.meta_loss(batch)[0].backward()
        grads.append(flat(p.grad for p in model.parameters()))
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], rtol=1e-10, atol=1e-13)


def test_adapt_filter_keeps_shared_parameters_fixed():
    model = tiny_mlp(4)
    learner = mamlkit.MAML(model, inner_lr=0.1, inner_steps=2, loss_fn="mse",
                           adapt_filter=lambda name: name.startswith("4."))
    batch = sinusoid_batch(tasks=1)
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    for name, p in model.named_parameters():
        same = torch.equal(fast[name], p.detach())
        assert same != name.startswith("4."), name


def test_adapt_reduces_support_loss_and_matches_manual_sgd():
    model = tiny_mlp(5)
    learner = mamlkit.MAML(model, inner_lr=0.1, inner_steps=1, loss_fn="mse", test_inner_steps=3)
    batch = sinusoid_batch(tasks=1)
    sx, sy = batch.support_x[0], batch.support_y[0]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        p = {n: v.requires_grad_() for n, v in params.items()}
        g = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, p, (sx,)), sy), list(p.values()))
        params = {n: (v - 0.1 * gi).detach() for (n, v), gi in zip(p.items(), g)}
    fast = learner.adapt(sx, sy)  # test_inner_steps=3
    for n in params:
        assert torch.allclose(fast[n], params[n], rtol=1e-12, atol=1e-14)
    before = F.mse_loss(model(sx), sy)
    after = F.mse_loss(mamlkit.engine.functional.call(model, fast, learner.buffers(), sx), sy)
    assert after < before


class ScaledMLP(nn.Module):
    """A model with a buffer: the output is multiplied by a registered constant."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp(6)
        self.register_buffer("scale", torch.tensor([2.5], dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.scale


def test_model_with_buffer_uses_it_and_strategies_agree():
    batch = sinusoid_batch(tasks=3, seed=9)
    grads = []
    for strategy in ("vmap", "loop"):
        model = ScaledMLP()
        learner = mamlkit.MAML(model, inner_lr=0.02, inner_steps=1, loss_fn="mse", strategy=strategy)
        learner.meta_loss(batch)[0].backward()
        grads.append(flat(p.grad for p in model.parameters()))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10)
    model = ScaledMLP()
    learner = mamlkit.MAML(model, inner_lr=0.02, inner_steps=1, loss_fn="mse")
    numeric = finite_difference_grad(lambda: learner.meta_loss(batch)[0], list(model.parameters()))
    assert torch.allclose(grads[0], numeric, rtol=1e-6, atol=1e-8)
    # the buffer changes the answer, so it is really read through functional_call
    with_buffer = learner.meta_loss(batch)[0].item()
    model.scale.fill_(1.0)
    assert abs(learner.meta_loss(batch)[0].item() - with_buffer) > 1e-3


def test_task_batch_checks_shapes():
    x = torch.zeros(2, 3, 1)
    with pytest.raises(ValueError, match="same number of tasks"):
        TaskBatch(x, x, torch.zeros(3, 3, 1), torch.zeros(3, 3, 1))
    with pytest.raises(ValueError, match="disagree"):
        TaskBatch(x, torch.zeros(2, 4, 1), x, x)
    with pytest.raises(ValueError, match="differ in shape"):
        TaskBatch(x, x, torch.zeros(2, 3, 2), torch.zeros(2, 3, 1))


def test_sinusoid_tasks_follow_the_paper_ranges_and_are_deterministic():
    dist = Sinusoid(k_support=10, k_query=10)
    a = dist.sample(500, task_generator(1, "train", 0))
    b = dist.sample(500, task_generator(1, "train", 0))
    c = dist.sample(500, task_generator(1, "train", 1))
    assert torch.equal(a.support_x, b.support_x) and not torch.equal(a.support_x, c.support_x)
    assert a.support_x.shape == (500, 10, 1) and a.query_y.shape == (500, 10, 1)
    assert a.support_x.min() >= -5 and a.support_x.max() <= 5
    amp, phase = dist.sample_params(10_000, task_generator(1, "train", 0))
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and 0 <= phase.min() and phase.max() <= torch.pi
    assert abs(amp.mean().item() - 2.55) < 0.05
