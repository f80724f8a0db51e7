"""Inner rules compose (optax-style: a rule returns the update), the test-time descent guard as a rule wrapper,
plain-SGD evaluation (the paper's protocol) by default, the baseline's Adam, and what reports print."""

import json

import pytest
import torch
from torch.func import functional_call, grad_and_value, vmap

import mamlkit
from mamlkit.algorithms.metasgd import MetaSGD
from mamlkit.algorithms.reptile import Reptile
from mamlkit.engine import rules
from mamlkit.engine.inner import support_loss_fn
from mamlkit.eval import baselines, reports
from mamlkit.eval.evaluate import evaluate
from mamlkit.eval.evaluate import test_tasks as fixed_tasks
from mamlkit.presets import preset_config
from mamlkit.tasks.sinusoid import Sinusoid

F64 = torch.float64


def _learner(lr=0.01, strategy="vmap", scale=1.0):
    """The sinusoid MLP in float64; ``scale`` > 1 sharpens it (output layer ×scale, others ×3) so that plain
    inner SGD at ``lr`` overshoots and blows up."""
    torch.manual_seed(0)
    model = mamlkit.models.mlp(1, (40, 40), 1).to(F64)
    if scale != 1.0:
        with torch.no_grad():
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            linears[-1].weight.mul_(scale)
            for m in linears[:-1]:
                m.weight.mul_(3.0)
    return mamlkit.MAML(model, inner_lr=lr, loss_fn="mse", strategy=strategy)


def test_sgd_returns_the_update_and_apply_updates_adds_it():
    g = {"w": torch.tensor([0.3, -2.0, 1e-3], dtype=F64)}
    w = {"w": torch.tensor([1.0, -1.0, 0.5], dtype=F64)}
    updates, state = rules.sgd(0.1).update(g, None, w)
    assert torch.equal(updates["w"], torch.tensor([-0.03, 0.2, -1e-4], dtype=F64)) and state is None
    assert torch.equal(rules.apply_updates(w, updates)["w"], w["w"] - 0.1 * g["w"])  # bit for bit θ − α∇L
    assert rules.apply_updates(w, {})["w"] is w["w"]  # no update: the parameter is kept


def test_chain_scale_and_clamp_compose_in_order():
    g = {"w": torch.tensor([0.3, -2.0, 1.0], dtype=F64)}
    w = {"w": torch.zeros(3, dtype=F64)}
    rule = rules.chain(rules.sgd(1.0), rules.scale(0.5), rules.clamp(0.4))
    updates, _ = rule.update(g, rule.init(w), w)
    assert torch.equal(updates["w"], torch.tensor([-0.15, 0.4, -0.4], dtype=F64))
    assert rule.describe() == "SGD at α=1, then scaled by 0.5, then each entry's step clamped to ±0.4"
    with pytest.raises(ValueError, match="bound"):
        rules.clamp(0.0)


def test_per_step_rates_with_a_clamp_are_a_composition():
    """MAML++'s per-step rates with a clamp: the rate of each step, then the bound, with no hand-written wrap."""
    rates = {"w": torch.tensor([0.1, 10.0], dtype=F64)}
    rule = rules.chain(rules.per_step_sgd(rates), rules.clamp(0.5))
    g = {"w": torch.tensor([1.0, -0.2], dtype=F64)}
    w = {"w": torch.zeros(2, dtype=F64)}
    first, _ = rule.update(g, rule.init(w), w, step=0)
    second, _ = rule.update(g, rule.init(w), w, step=1)
    late, _ = rule.update(g, rule.init(w), w, step=7)  # beyond K: the last rate
    assert torch.equal(first["w"], -0.1 * g["w"])
    assert torch.equal(second["w"], torch.tensor([-0.5, 0.5], dtype=F64)) and torch.equal(late["w"], second["w"])
    assert rule.describe() == ("per-layer, per-step learned rates (MAML++ LSLR), mean 5.05, then each entry's step "
                               "clamped to ±0.5")


def test_learners_describe_their_own_rule():
    torch.manual_seed(0)
    model = mamlkit.models.mlp(1, (8,), 1).to(F64)
    assert mamlkit.MAML(model, inner_lr=0.05).describe() == "SGD at α=0.05"
    assert MetaSGD(model, inner_lr=0.05).describe() == "per-parameter learned rates (Meta-SGD), mean 0.05"
    assert Reptile(model, inner_lr=0.02, inner_optimizer="adam").describe() == "Adam at lr=0.02, β=(0, 0.999), ε=1e-08"
    assert mamlkit.MAML(model, inner_lr=0.05).describe(guard=True) == \
        "SGD at α=0.05, with step halving when the support loss rises"
    from mamlkit.algorithms.anil import ANIL

    assert ANIL(model, inner_lr=0.4).describe() == "SGD at α=0.4, on 2 of 4 parameter tensors (2.weight, 2.bias)"


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_plain_sgd_evaluation_equals_a_hand_written_sgd_loop(strategy):
    """The default evaluation is the paper's protocol: θ ← θ − α∇L on the support set, nothing else."""
    learner = _learner(lr=0.05, strategy=strategy)
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 6).to(dtype=F64)
    got = evaluate(learner, tasks, 3, dtype=F64)
    assert got.halved is None
    model = learner.model
    for t in range(tasks.num_tasks):
        params = {k: v.detach() for k, v in model.named_parameters()}
        expected = []
        for step in range(4):
            query = torch.nn.functional.mse_loss(functional_call(model, params, (tasks.query_x[t],)), tasks.query_y[t])
            expected.append(query)
            if step < 3:
                fast = {k: v.requires_grad_() for k, v in {k: v.clone() for k, v in params.items()}.items()}
                loss = torch.nn.functional.mse_loss(functional_call(model, fast, (tasks.support_x[t],)),
                                                    tasks.support_y[t])
                grads = torch.autograd.grad(loss, list(fast.values()))
                params = {k: (p - 0.05 * g).detach() for (k, p), g in zip(params.items(), grads)}
        expected = torch.stack(expected).detach()
        if strategy == "loop":
            assert torch.equal(got.losses[t], expected), (got.losses[t], expected)
        else:
            assert torch.allclose(got.losses[t], expected, rtol=1e-12, atol=0)


def _support_curve(learner, tasks, steps, guard):
    """Support loss ``[T, steps+1]`` after 0..steps inner steps of ``learner.adapt``, task by task."""
    loss = support_loss_fn(learner.model, learner.loss_fn, {}, learner.buffers())
    return torch.tensor([[float(loss(learner.adapt(tasks.support_x[t], tasks.support_y[t], s, guard=guard),
                                     tasks.support_x[t], tasks.support_y[t])) for s in range(steps + 1)]
                         for t in range(tasks.num_tasks)], dtype=F64)


def test_the_guard_never_raises_the_support_loss_where_plain_sgd_blows_up():
    learner = _learner(lr=0.01, scale=10.0)
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 8).to(dtype=F64)
    plain = _support_curve(learner, tasks, 6, guard=False)
    assert not torch.isfinite(plain[:, -1]).all() or (plain[:, -1] > 10 * plain[:, 0]).any()  # it blows up
    guarded = _support_curve(learner, tasks, 6, guard=True)
    assert torch.isfinite(guarded).all()
    assert (guarded[:, 1:] <= guarded[:, :-1] * (1 + rules.DESCENT_TOLERANCE)).all()
    assert (guarded[:, -1] < guarded[:, 0]).all()  # and it still descends
    # evaluation through the same guard: every cell finite, the halved tasks counted
    result = evaluate(learner, tasks, 6, dtype=F64, guard=True)
    assert torch.isfinite(result.losses).all() and 0 < int(result.halved.sum()) <= tasks.num_tasks


def test_the_guard_is_the_same_under_vmap_and_in_the_loop():
    """Under vmap every halving is tried (no Python branch on a value); the loop stops at the first that
    descends: the same steps."""
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 8)
    vm = evaluate(_learner(scale=10.0, strategy="vmap"), tasks, 4, dtype=F64, guard=True)
    lp = evaluate(_learner(scale=10.0, strategy="loop"), tasks, 4, dtype=F64, guard=True)
    assert torch.equal(vm.halved, lp.halved) and int(vm.halved.sum()) > 0
    assert torch.allclose(vm.losses, lp.losses, rtol=1e-10, atol=0)


def test_the_guarded_gradient_is_the_gradient_of_the_step_taken():
    """The halving factor is a constant of the graph: d(θ1)/dθ0 through a halved step is that of SGD at the
    halved rate."""
    w0 = torch.tensor([3.0], dtype=F64, requires_grad=True)

    def value_fn(p):
        return (p["w"] ** 2).sum()

    rule = rules.descent_guard(rules.sgd(1.5))  # the full step overshoots to −6: the loss rises from 9 to 36
    g = {"w": 2 * w0}
    updates, state = rule.update(g, rule.init({"w": w0}), {"w": w0}, value_fn=value_fn)
    w1 = rules.apply_updates({"w": w0}, updates)["w"]
    assert bool(state.halved) and w1.item() == -1.5  # halved once: θ − (α/2)·2θ = 3 − 4.5
    (grad,) = torch.autograd.grad(w1.sum(), w0)
    assert grad.item() == -0.5  # d/dθ (θ − (α/2)·2θ) = 1 − α = −0.5, the halved step's


def test_scratch_baseline_uses_the_rules_adam_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(F64)
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 3).to(dtype=F64)
    losses, _ = baselines.scratch_losses(model, "mse", tasks.support_x, tasks.support_y, tasks.query_x,
                                         tasks.query_y, steps=20, lr=0.01, seed=1)
    with torch.random.fork_rng(devices=[]):  # the same fresh initialisation the baseline draws
        torch.manual_seed(1)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        p0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def task_loss(p, x, y):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    def hand_adam(x, y, xq, yq, square):
        p, b1, b2, lr, eps = dict(p0), 0.9, 0.999, 0.01, 1e-8
        m = {k: torch.zeros_like(v) for k, v in p.items()}
        v = {k: torch.zeros_like(t) for k, t in p.items()}
        for t in range(1, 21):
            g, _ = grad_and_value(task_loss)(p, x, y)
            m = {k: b1 * m[k] + (1 - b1) * g[k] for k in p}
            v = {k: b2 * v[k] + square(g[k]) for k in p}
            p = {k: p[k] - lr * (m[k] / (1 - b1 ** t)) / ((v[k] / (1 - b2 ** t)).sqrt() + eps) for k in p}
        return task_loss(p, xq, yq)

    args = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
    # the rules' Adam (Reptile's inner optimiser, kept bit for bit): (1 − β2)·g·g
    same = vmap(lambda *a: hand_adam(*a, square=lambda g: (1 - 0.999) * g * g))(*args)
    assert torch.equal(losses, same)
    # the baseline's earlier hand-written Adam, (1 − β2)·g², rounds the second moment differently: last bits only
    earlier = vmap(lambda *a: hand_adam(*a, square=lambda g: (1 - 0.999) * g ** 2))(*args)
    assert torch.allclose(losses, earlier, rtol=1e-12, atol=0)


FAST = dict(eval_tasks=8, eval_shots=(5,), eval_steps=(0, 1, 5), eval_query=0, dtype="float64",
            compare_pretrained=False, progress=False, tensorboard=False)


@pytest.mark.parametrize("guard", [False, True])
def test_the_report_says_which_table_it_shows(tmp_path, guard):
    """Default: plain SGD, where a blow-up shows as a flagged cell; ``test_guard``: the guarded table, with the
    halved tasks counted. Both name every learner's rule (its ``describe()``)."""
    cfg = preset_config("sinusoid", {**FAST, "out_dir": str(tmp_path), "test_guard": guard})
    learners = {"maml": _learner(lr=0.01), "pretrain": _learner(lr=0.01, scale=10.0)}
    text = reports.report(tmp_path, learners, cfg)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["test_guard"] is guard
    assert "Each cell: mean ± 95% CI over the tasks, then the median" in text
    if guard:
        assert "Test-time adaptation, guarded (--test-guard)" in text
        assert "maml: SGD at α=0.01, with step halving when the support loss rises" in text
        assert record["inner_rules"]["pretrain"] == "SGD at α=0.01, with step halving when the support loss rises"
        assert record["halved_tasks"]["pretrain"]["5"] > 0 and "Tasks on which some test-time step was halved" in text
        assert record["mse"]["pretrain"]["5"]["5"]["mean"] is not None
    else:
        assert "the paper's protocol, each learner's own inner rule, no step halved (maml: SGD at α=0.01; " \
               "pretrain: SGD at α=0.01)" in text
        assert "halved_tasks" not in record and "halved" not in text.split("\n", 2)[2]
        assert record["mse"]["pretrain"]["5"]["5"]["flag"] is not None and "⚠" in text  # the blow-up is visible
        assert record["mse"]["maml"]["5"]["1"]["flag"] is None


def test_a_mean_far_above_the_median_is_flagged():
    from mamlkit.eval.evaluate import EvalResult

    losses = torch.full((40, 2), 1.0, dtype=F64)
    losses[:, 1] = 0.1
    losses[:10, 1] = 5.0  # a quarter of the tasks: finite, under 10× their pre-update loss, CI narrower than the mean
    cell = EvalResult(losses, torch.zeros_like(losses)).cell(1)
    assert cell["median"] == pytest.approx(0.1) and cell["ci95"] < cell["mean"]
    assert cell["flag"] == "mean over 5× the median: outlier tasks"


def test_an_accuracy_cell_keeps_the_median_and_flags_a_loss_that_is_not_finite():
    from mamlkit.eval.evaluate import EvalResult

    losses = torch.tensor([[1.0, 0.5], [1.0, float("nan")], [1.0, 0.4], [1.0, 0.3]], dtype=F64)
    accs = torch.tensor([[0.2, 0.8], [0.2, 0.2], [0.2, 1.0], [0.2, 1.0]], dtype=F64)
    r = EvalResult(losses, accs)
    assert r.acc_cell(0) == {"mean": pytest.approx(0.2), "ci95": pytest.approx(0.0, abs=1e-12), "median": 0.2,
                             "flag": None}
    cell = r.acc_cell(1)
    assert cell["mean"] == pytest.approx(0.75) and cell["median"] == 0.8  # torch's median: the lower middle
    assert cell["flag"] == "loss not finite on 1/4 tasks"
    text = r.acc_text(1)
    assert text.startswith("75.00 ± ") and text.endswith("(median 80.00) ⚠ loss not finite on 1/4 tasks")


def test_a_methods_cell_keeps_the_median_and_flags_a_value_that_is_not_finite():
    from mamlkit.tasks import Column

    loss = torch.tensor([0.5, 0.1, float("inf"), 0.3], dtype=F64)
    acc = torch.tensor([0.8, 0.2, 1.0, 1.0], dtype=F64)
    text = reports._cells((Column("acc", "accuracy"), Column("loss", "loss")), loss, acc)
    shown_acc, shown_loss = text.split(" | ")
    assert shown_acc.startswith("75.00 ± ") and shown_acc.endswith("(median 80.00)")
    assert "(median 0.300) ⚠ not finite on 1/4 tasks" in shown_loss
