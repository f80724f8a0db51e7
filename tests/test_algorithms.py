"""The MAML family on one engine: each algorithm's defining identity, in float64, plus generic
checks over the whole algorithm registry."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamlkit.algorithms import ALGORITHMS, MetaLearner, build_learner
from mamlkit.algorithms.anil import ANIL
from mamlkit.algorithms.boil import BOIL
from mamlkit.algorithms.imaml import IMAML
from mamlkit.algorithms.maml import MAML
from mamlkit.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from mamlkit.algorithms.metasgd import MetaSGD
from mamlkit.algorithms.reptile import Reptile
from mamlkit.config import ConfigError, TrainConfig
from mamlkit.engine.inner import conjugate_gradient
from mamlkit.engine.rules import adam, apply_updates
from mamlkit.loop import schedules
from mamlkit.tasks import Sinusoid, TaskBatch, task_generator

ATOL = 1e-11


@pytest.fixture(autouse=True)
def _one_thread():
    # These graphs are tiny: a second intra-op thread only adds synchronisation. Measured on the shared
    # 2-core machine under load: the conv4 tests take 0.2 s with 1 thread and 21 s with 2.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(1, 8), nn.BatchNorm1d(8, track_running_stats=False)] if bn else [nn.Linear(1, 8)]
    layers += [nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)]
    return nn.Sequential(*layers).double()


def tiny_conv4(seed=0):
    from mamlkit.models import conv4

    torch.manual_seed(seed)
    return conv4(in_channels=1, out_features=3, hidden=4, image_size=8).double()


def sinusoid_batch(tasks=3, k=5, seed=0):
    tasks = Sinusoid(k_support=k, k_query=k).sample(tasks, task_generator(seed, "test", 0))
    return tasks.to(dtype=torch.float64)


def image_batch(tasks=1, n_way=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 2 * n_way, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n_way).repeat(2).expand(tasks, -1)
    return TaskBatch(x[:, :n_way], y[:, :n_way], x[:, n_way:], y[:, n_way:])


def grads_of(learner, batch, backward=True):
    """Meta-loss value and ``{name: grad}`` over the learner's meta-parameters (grads cleared first)."""
    params = learner.meta_parameters()
    for p in params.values():
        p.grad = None
    loss, _ = learner.meta_loss(batch)
    if backward:
        loss.backward()
    return loss.detach(), {k: (p.grad.clone() if p.grad is not None else None) for k, p in params.items()}


def assert_same(a, b, keys=None, atol=ATOL):
    for k in keys or a:
        assert a[k] is not None and b[k] is not None, f"no gradient on {k}"
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"


# ---------------------------------------------------------------------------------------------
# Identities


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_metasgd_with_all_rates_alpha_equals_maml(strategy):
    batch = sinusoid_batch()
    maml = MAML(mlp(), inner_lr=0.03, inner_steps=2, strategy=strategy)
    msgd = MetaSGD(mlp(), inner_lr=0.03, inner_steps=2, strategy=strategy)
    (l1, g1), (l2, g2) = grads_of(maml, batch), grads_of(msgd, batch)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2)
    # The rates are meta-learned: each gets its own non-zero gradient, named inner_lr/<param>.
    assert set(msgd.meta_parameters()) - set(g1) == {f"inner_lr/{k}" for k in g1}
    assert all(g2[f"inner_lr/{k}"].abs().sum() > 0 for k in g1)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_boil_is_maml_with_the_heads_inner_rate_zero(strategy, first_order):
    """BOIL (Oh et al. 2021) freezes the head in the inner loop: the paper's inner rate 0 for the head. So
    it equals Meta-SGD whose head rates are all 0 and body rates α (loss, model gradients, evaluation),
    its head leaves ``adapt`` unchanged, and it is not MAML (whose head adapts)."""
    batch = sinusoid_batch()
    boil = BOIL(mlp(), inner_lr=0.1, inner_steps=3, first_order=first_order, strategy=strategy)
    msgd = MetaSGD(mlp(), inner_lr=0.1, inner_steps=3, first_order=first_order, strategy=strategy)
    with torch.no_grad():
        for k, rate in msgd.inner_lrs.items():
            if k.startswith("4."):  # the MLP's last Linear is the head
                rate.zero_()
    (l1, g1), (l2, g2) = grads_of(boil, batch), grads_of(msgd, batch)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2, keys=list(g1))
    assert torch.allclose(boil.adapted_losses(batch, 2)[0], msgd.adapted_losses(batch, 2)[0], atol=ATOL)
    fast = boil.adapt(batch.support_x[0], batch.support_y[0], 2)
    params = dict(boil.model.named_parameters())
    assert torch.equal(fast["4.weight"], params["4.weight"]) and torch.equal(fast["4.bias"], params["4.bias"])
    assert not torch.equal(fast["0.weight"], params["0.weight"])  # the body adapted
    l3, _ = grads_of(MAML(mlp(), inner_lr=0.1, inner_steps=3, first_order=first_order, strategy=strategy), batch)
    assert abs(l3 - l1) > 1e-6


def test_boil_on_conv4_freezes_the_head_and_is_registered():
    batch = image_batch(tasks=2)
    cfg = TrainConfig(dtype="float64", loss="cross_entropy", inner_lr=0.3, inner_steps=2, strategy="loop")
    boil = build_learner("boil", tiny_conv4(), cfg)
    maml = MAML(tiny_conv4(), inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy", strategy="loop",
                adapt_filter=lambda n: not n.startswith("head."))
    assert boil.name == "boil" and isinstance(boil, MetaLearner)
    (l1, g1), (l2, g2) = grads_of(boil, batch), grads_of(maml, batch)
    assert torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    fast = boil.adapt(batch.support_x[0], batch.support_y[0])
    assert torch.equal(fast["head.weight"], boil.model.head.weight)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_equals_maml_with_the_body_frozen_mlp(strategy, first_order):
    batch = sinusoid_batch()
    maml = MAML(mlp(), inner_lr=0.1, inner_steps=3, first_order=first_order, strategy=strategy,
                adapt_filter=lambda n: n.startswith("4."))  # the MLP's last Linear
    anil = ANIL(mlp(), inner_lr=0.1, inner_steps=3, first_order=first_order, strategy=strategy)
    assert anil.head_name == "4"
    (l1, g1), (l2, g2) = grads_of(maml, batch), grads_of(anil, batch)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2)
    # Evaluation and adapt agree as well.
    assert torch.allclose(maml.adapted_losses(batch, 2)[0], anil.adapted_losses(batch, 2)[0], atol=ATOL)
    a1, a2 = maml.adapt(batch.support_x[0], batch.support_y[0], 2), anil.adapt(batch.support_x[0],
                                                                               batch.support_y[0], 2)
    assert_same(a1, a2)


def test_anil_equals_maml_with_the_body_frozen_conv4_batchnorm():
    batch = image_batch()
    kw = dict(inner_lr=0.4, inner_steps=2, loss_fn="cross_entropy", strategy="loop")
    maml = MAML(tiny_conv4(), adapt_filter=lambda n: n.startswith("head."), **kw)
    anil = ANIL(tiny_conv4(), **kw)
    (l1, g1), (l2, g2) = grads_of(maml, batch), grads_of(anil, batch)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2)
    assert g2["body.0.0.weight"].abs().sum() > 0  # the second-order path reaches the body


def test_anil_rejects_a_model_without_a_sequential_head():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

    with pytest.raises(ValueError, match="nn.Sequential"):
        ANIL(Net())


@pytest.mark.parametrize("bn", [False, True])
def test_mamlpp_with_every_extra_off_equals_maml(bn):
    batch = sinusoid_batch()
    maml = MAML(mlp(bn=bn), inner_lr=0.05, inner_steps=3, strategy="vmap")
    pp = MAMLPlusPlus(mlp(bn=bn), inner_lr=0.05, inner_steps=3, msl=False, lslr=False, per_step_bn=False,
                      strategy="vmap")
    (l1, g1), (l2, g2) = grads_of(maml, batch), grads_of(pp, batch)
    assert set(g1) == set(g2)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2)


def test_mamlpp_lslr_at_init_equals_maml_and_learns_a_rate_per_layer_and_step():
    batch = sinusoid_batch()
    maml = MAML(mlp(), inner_lr=0.05, inner_steps=3)
    pp = MAMLPlusPlus(mlp(), inner_lr=0.05, inner_steps=3, msl=False, lslr=True, per_step_bn=False)
    (l1, g1), (l2, g2) = grads_of(maml, batch), grads_of(pp, batch)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2)
    for k in g1:
        assert g2[f"inner_lr/{k}"].shape == (3,) and (g2[f"inner_lr/{k}"].abs() > 0).all(), k


def test_mamlpp_per_step_bn_with_equal_copies_equals_maml_with_norms_not_adapted():
    """Copies of the norm weights per step, all equal to θ's: same loss as MAML with norms not
    adapted, and the gradients of the K+1 copies sum to MAML's gradient on the shared weights."""
    batch = sinusoid_batch()
    norm = ("1.weight", "1.bias")
    maml = MAML(mlp(bn=True), inner_lr=0.05, inner_steps=2, adapt_filter=lambda n: n not in norm)
    pp = MAMLPlusPlus(mlp(bn=True), inner_lr=0.05, inner_steps=2, msl=False, lslr=False, per_step_bn=True)
    assert set(pp.bn) == set(norm) and pp.bn["1.weight"].shape == (3, 8)
    (l1, g1), (l2, g2) = grads_of(maml, batch), grads_of(pp, batch)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2, keys=[k for k in g1 if k not in norm])
    for k in norm:
        assert torch.allclose(g2[f"bn/{k}"].sum(0), g1[k], atol=ATOL, rtol=0), k
        assert (g2[f"bn/{k}"].abs().sum(1) > 0).all(), f"a step copy of {k} gets no gradient"


def test_msl_weights_anneal_from_uniform_to_the_last_step():
    w0, w5, w10 = (msl_weights(4, e, 10, torch.float64) for e in (0, 5, 10))
    assert torch.allclose(w0, torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.allclose(w5, torch.tensor([0.125, 0.125, 0.125, 0.625], dtype=torch.float64))
    assert torch.equal(w10, torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    assert msl_weights(4, 99, 100, torch.float64)[0] == pytest.approx(0.03 / 4)  # the floor near the end
    for w in (w0, w5, w10):
        assert w.sum().item() == pytest.approx(1.0)


def test_mamlpp_multi_step_loss_is_the_weighted_query_loss_after_every_step():
    batch = sinusoid_batch()
    pp = MAMLPlusPlus(mlp(), inner_lr=0.05, inner_steps=3, msl=True, msl_epochs=10, lslr=False,
                      per_step_bn=False, epoch_iterations=10)
    per_step = pp.adapted_losses(batch, 3)[0].mean(0)  # [K+1]: query loss after 0..K steps
    for step, epoch in ((0, 0), (50, 5), (100, 10)):
        pp.set_step(step)
        w = msl_weights(3, epoch, 10, torch.float64)
        assert pp.meta_loss(batch)[0].item() == pytest.approx((w * per_step[1:]).sum().item(), abs=1e-12)


def test_mamlpp_derivative_order_annealing_is_first_order_then_second_order():
    batch = sinusoid_batch()
    kw = dict(inner_lr=0.05, inner_steps=2)
    pp = MAMLPlusPlus(mlp(), msl=False, lslr=False, per_step_bn=False, first_order_epochs=2,
                      epoch_iterations=5, **kw)
    fo, so = MAML(mlp(), first_order=True, **kw), MAML(mlp(), **kw)
    pp.set_step(9)  # epoch 1: first order
    assert_same(grads_of(pp, batch)[1], grads_of(fo, batch)[1])
    pp.set_step(10)  # epoch 2: second order
    assert_same(grads_of(pp, batch)[1], grads_of(so, batch)[1])
    assert not torch.allclose(grads_of(fo, batch)[1]["0.weight"], grads_of(so, batch)[1]["0.weight"])


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_reptile_one_sgd_step_gives_alpha_times_the_support_gradient(strategy):
    batch, alpha = sinusoid_batch(), 0.05
    model = mlp()
    reptile = Reptile(model, inner_lr=alpha, inner_steps=1, inner_optimizer="sgd", strategy=strategy)
    reptile.meta_backward(batch)
    names = [k for k, _ in model.named_parameters()]
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for t in range(batch.num_tasks):
        loss = F.mse_loss(model(batch.support_x[t]), batch.support_y[t])
        for k, g in zip(names, torch.autograd.grad(loss, list(model.parameters()))):
            expected[k] += alpha * g / batch.num_tasks
    got = {k: p.grad for k, p in model.named_parameters()}
    assert_same(expected, got, atol=1e-13)


def test_reptile_logged_loss_is_the_query_loss_after_adaptation():
    batch = sinusoid_batch()
    reptile = Reptile(mlp(), inner_lr=0.05, inner_steps=3)
    loss, _ = reptile.meta_loss(batch)
    assert loss.item() == pytest.approx(reptile.adapted_losses(batch, 3)[0][:, -1].mean().item(), abs=1e-12)


def test_adam_rule_first_step_is_lr_times_sign_and_matches_torch_adam():
    g = {"w": torch.tensor([0.3, -2.0, 1e-3], dtype=torch.float64)}
    w = {"w": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}
    rule = adam(0.1, betas=(0.5, 0.9))
    state = rule.init(w)
    p = torch.nn.Parameter(w["w"].clone())
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.9), eps=1e-8)
    for step in range(3):
        grads = {"w": g["w"] * (step + 1)}
        updates, state = rule.update(grads, state, w, step=step)
        w = apply_updates(w, updates)
        p.grad = grads["w"].clone()
        opt.step()
    assert torch.allclose(w["w"], p.detach(), atol=1e-14)


def test_conjugate_gradient_solves_an_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=12)["x"]
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-9)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_imaml_implicit_gradient_matches_the_closed_form_on_a_quadratic_task(strategy):
    """Linear model + MSE: L_s(z) = ½ zᵀAz − bᵀz + c, so φ*(θ) = (A + λI)⁻¹(b + λθ) exactly, and the
    meta-gradient of L_q(φ*(θ)) has a closed form; iMAML (GD inner solve + CG) must match it."""
    lam, tasks, n = 2.0, 2, 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, 2 * n, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(tasks, 2 * n, 1, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * noise
    batch = TaskBatch(x[:, :n], y[:, :n], x[:, n:], y[:, n:])
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).requires_grad_()
    total, lr = 0.0, None
    for t in range(tasks):
        xs = torch.cat([batch.support_x[t], torch.ones(n, 1, dtype=torch.float64)], 1)
        xq = torch.cat([batch.query_x[t], torch.ones(n, 1, dtype=torch.float64)], 1)
        a, b = 2 / n * xs.T @ xs, 2 / n * xs.T @ batch.support_y[t, :, 0]
        phi = torch.linalg.solve(a + lam * torch.eye(4, dtype=torch.float64), b + lam * theta)
        total = total + ((xq @ phi - batch.query_y[t, :, 0]) ** 2).mean() / tasks
        top = torch.linalg.eigvalsh(a).max().item() + lam
        lr = min(lr or 1.0, 1.0 / top)
    (expected,) = torch.autograd.grad(total, theta)
    imaml = IMAML(model, inner_lr=lr, inner_steps=600, lam=lam, cg_steps=6, strategy=strategy)
    loss, _ = imaml.meta_loss(batch)
    loss.backward()
    got = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()
    assert loss.item() == pytest.approx(total.item(), abs=1e-9)


def test_imaml_memory_does_not_grow_with_inner_steps():
    """No graph is kept through the inner loop: the autograd graph of the meta-loss has the same
    number of nodes for 2 and 20 inner steps."""
    batch = sinusoid_batch()

    def graph_size(steps):
        loss, _ = IMAML(mlp(), inner_lr=0.01, inner_steps=steps, strategy="loop").meta_loss(batch)
        seen, todo = set(), [loss.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
        return len(seen)

    assert graph_size(2) == graph_size(20)


# ---------------------------------------------------------------------------------------------
# Generic checks over the registry


def cfg_for(strategy="vmap", algo="maml", **kw):
    """The config of algorithm ``algo``; the options only some algorithms read apply to those that read them."""
    from mamlkit.config import from_dict

    options = dict(reptile_inner_steps=2, first_order_epochs=0)
    return from_dict(dict(algo=algo, dtype="float64", inner_lr=0.05, inner_steps=2, test_inner_steps=2,
                          strategy=strategy, **options, **kw), loose=set(options))


@pytest.fixture(scope="module")
def reference_grads():
    """Every algorithm's meta-loss and gradients (vmap), computed once."""
    batch = sinusoid_batch(tasks=4)
    out = {}
    for name in sorted(ALGORITHMS):
        learner = build_learner(name, mlp(), cfg_for(algo=name))
        for p in learner.meta_parameters().values():
            p.grad = None
        stats = learner.meta_backward(batch)
        out[name] = (stats["loss"], {k: p.grad for k, p in learner.meta_parameters().items()})
    return batch, out


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_has_a_finite_loss_and_a_gradient_on_every_meta_parameter(name, reference_grads):
    _, out = reference_grads
    loss, grads = out[name]
    assert torch.isfinite(torch.tensor(loss)), f"{name}: loss {loss}"
    for k, g in grads.items():
        assert g is not None, f"{name}: meta-parameter {k} has no gradient"
        assert torch.isfinite(g).all(), f"{name}: NaN/inf gradient on {k}"
        assert g.abs().sum() > 0, f"{name}: zero gradient on meta-parameter {k}"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_is_deterministic_and_vmap_equals_loop_and_meta_loss(name, reference_grads):
    batch, out = reference_grads
    loss_ref, ref = out[name]
    for strategy, chunk in (("vmap", 0), ("loop", 0), ("vmap", 3), ("threads", 0)):
        learner = build_learner(name, mlp(), cfg_for(strategy, algo=name, chunk_size=chunk))
        stats = learner.meta_backward(batch)
        got = {k: p.grad for k, p in learner.meta_parameters().items()}
        assert stats["loss"] == pytest.approx(loss_ref, abs=1e-12), f"{name} {strategy}"
        assert_same(ref, got, atol=1e-10)
    # meta_loss().backward() == meta_backward()
    loss, grads = grads_of(build_learner(name, mlp(), cfg_for(algo=name)), batch)
    assert loss.item() == pytest.approx(loss_ref, abs=1e-12)
    assert_same(ref, grads, atol=1e-10)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_adapts_and_evaluates(name):
    batch = sinusoid_batch()
    learner = build_learner(name, mlp(), cfg_for(algo=name))
    assert isinstance(learner, MetaLearner) and learner.name == name
    losses, accs = learner.adapted_losses(batch, 3)
    assert losses.shape == (3, 4) and torch.isfinite(losses).all()
    fast = learner.adapt(batch.support_x[0], batch.support_y[0], steps=3)
    assert set(fast) == {k for k, _ in learner.model.named_parameters()}
    pred = torch.func.functional_call(learner.model, fast, (batch.query_x[0],))
    assert F.mse_loss(pred, batch.query_y[0]).item() == pytest.approx(losses[0, 3].item(), abs=1e-10), name


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_conv4_with_batchnorm(name):
    cfg = cfg_for("loop", algo=name, loss="cross_entropy")
    learner = build_learner(name, tiny_conv4(), cfg)
    learner.meta_backward(image_batch())
    for k, p in learner.meta_parameters().items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: meta-parameter {k}"


# ---------------------------------------------------------------------------------------------
# Trainer: schedules, the step hook, checkpoints of learned extras, CLI


def test_meta_lr_schedules():
    cos = TrainConfig(meta_lr=1e-3, min_meta_lr=1e-5, meta_lr_schedule="cosine", iterations=100)
    assert schedules.meta_lr_at(cos, 0) == pytest.approx(1e-3)
    assert schedules.meta_lr_at(cos, 50) == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedules.meta_lr_at(cos, 100) == pytest.approx(1e-5)
    lin = cos.replace(meta_lr_schedule="linear", min_meta_lr=0.0)
    assert schedules.meta_lr_at(lin, 25) == pytest.approx(0.75e-3)
    assert schedules.meta_lr_at(cos.replace(meta_lr_schedule="constant"), 70) == 1e-3
    with pytest.raises(ConfigError, match="meta_lr_schedule"):
        TrainConfig(meta_lr_schedule="step")
    with pytest.raises(ConfigError, match="imaml_lambda"):
        TrainConfig(algo="imaml", imaml_lambda=0.0)


@pytest.mark.parametrize("algo,meta_optimizer", [("metasgd", "adam"), ("mamlpp", "adam"), ("reptile", "sgd")])
def test_cli_smoke_and_learned_extras_round_trip_through_the_checkpoint(algo, meta_optimizer, cli, tmp_path):
    from mamlkit.loop import train

    args = ["train", "sinusoid", "--algo", algo, "--iterations", "3", "--eval-tasks", "4",
            "--eval-shots", "5", "--eval-steps", "0", "1", "--val-tasks", "4", "--no-compare-pretrained",
            "--no-progress", "--no-tensorboard", "--out-dir", str(tmp_path), "--meta-lr", "0.01",
            "--meta-lr-schedule", "cosine", "--meta-optimizer", meta_optimizer]
    if algo == "mamlpp":  # MAML++'s own schedule flags (another algorithm refuses them: they would do nothing)
        args += ["--epoch-iterations", "1", "--first-order-epochs", "1"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "MSE" in out
    trainer = train.load_trainer(tmp_path / f"sinusoid-{algo}")
    assert trainer.step == 3
    assert isinstance(trainer.optimizer, torch.optim.SGD if meta_optimizer == "sgd" else torch.optim.Adam)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(schedules.meta_lr_at(trainer.cfg, 2))
    extras = {k: v for k, v in trainer.learner.meta_parameters().items() if "/" in k}
    if algo in ("metasgd", "mamlpp"):
        assert extras, f"{algo} saved no learned extras"
    for k, v in extras.items():  # trained (moved from the initial rate) and restored
        assert not torch.allclose(v, torch.full_like(v, trainer.cfg.inner_lr)), k


def test_support_bn_mode_carries_over_to_every_algorithm():
    """bn_mode="support" (query images normalised with support statistics) gives the same identities."""
    batch = image_batch()
    kw = dict(inner_lr=0.4, inner_steps=2, loss_fn="cross_entropy", strategy="loop", bn_mode="support")
    maml = MAML(tiny_conv4(), **kw)
    l0, g0 = grads_of(maml, batch)
    trans = MAML(tiny_conv4(), **{**kw, "bn_mode": "transductive"})
    assert abs(grads_of(trans, batch)[0] - l0) > 1e-6  # the mode matters on this batch
    for other in (MetaSGD(tiny_conv4(), **kw),
                  MAMLPlusPlus(tiny_conv4(), msl=False, lslr=False, per_step_bn=False, **kw)):
        l1, g1 = grads_of(other, batch)
        assert torch.allclose(l0, l1, atol=ATOL, rtol=0), other.name
        assert_same(g0, g1, keys=list(g0))
    head = MAML(tiny_conv4(), adapt_filter=lambda n: n.startswith("head."), **kw)
    (l1, g1), (l2, g2) = grads_of(head, batch), grads_of(ANIL(tiny_conv4(), **kw), batch)
    assert torch.allclose(l1, l2, atol=ATOL, rtol=0)
    assert_same(g1, g2)
    # Reptile's SGD evaluation path is MAML's; iMAML's is too as λ → 0.
    ref = maml.adapted_losses(batch, 2)[0]
    reptile = Reptile(tiny_conv4(), inner_optimizer="sgd", **kw)
    assert torch.allclose(reptile.adapted_losses(batch, 2)[0], ref, atol=ATOL)
    imaml = IMAML(tiny_conv4(), lam=1e-12, **kw)
    assert torch.allclose(imaml.adapted_losses(batch, 2)[0], ref, atol=1e-9)


@pytest.mark.parametrize("algo,extra", [
    ("mamlpp", dict(inner_steps=2, msl_epochs=2, first_order_epochs=1, epoch_iterations=2,
                    meta_lr_schedule="cosine", min_meta_lr=1e-4)),
    ("reptile", dict(meta_optimizer="sgd", meta_lr=0.5, meta_lr_schedule="linear")),
])
def test_resume_equals_uninterrupted_with_step_hooks_and_schedules(algo, extra, tmp_path):
    """set_step-driven annealing and the meta-rate schedule are pure functions of the step: a run
    stopped and resumed from its checkpoint ends with the same meta-parameters, extras included."""
    from mamlkit.loop import train
    from mamlkit.presets import preset_config

    cfg = preset_config("sinusoid", dict(algo=algo, iterations=6, log_every=3, val_tasks=0, checkpoint_every=100,
                                         progress=False, tensorboard=False, hidden_sizes=(8, 8), meta_batch=4,
                                         strategy="vmap",  # not auto's timed choice: two runs compared bitwise
                                         out_dir=str(tmp_path), **extra))
    straight = train.fit(train.new_trainer(cfg, tmp_path / "straight"))
    first = train.fit(train.new_trainer(cfg, tmp_path / "split"), stop_at=3)
    train.save_checkpoint(first, tmp_path / "split" / "checkpoint.safetensors")
    resumed = train.fit(train.load_trainer(tmp_path / "split"))
    a, b = straight.learner.meta_parameters(), resumed.learner.meta_parameters()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].detach(), b[k].detach()), k
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
