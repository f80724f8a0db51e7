"""Meta-RL (MAML-TRPO): environments, advantages, conjugate gradient, Fisher products, TRPO, CLI."""

from __future__ import annotations

import json
import math
import shlex
import signal
import subprocess
import sys
import time
from contextlib import nullcontext as _nullcontext

import numpy as np
import pytest
import torch

from mamlkit import checkpoint
from mamlkit.base.batch import task_generator
from mamlkit.cli import main
from mamlkit.config import ConfigError
from mamlkit.rl import sampling
from mamlkit.rl.advantages import baseline_features, discounted_returns, fit_linear_baseline, gae, normalize
from mamlkit.rl.config import RLConfig, from_dict
from mamlkit.rl.envs import Nav2D, make_env, sample_tasks
from mamlkit.rl.maml_trpo import MAMLTRPO
from mamlkit.rl.policy import build_policy, kl_divergence, log_prob
from mamlkit.rl.trpo import autograd_linearization, conjugate_gradient, fisher_vector_product, flat, solve_cg, trpo_step

torch.set_num_threads(1)
D = torch.float64

# A tiny nav2d setting that runs in well under a second per meta-iteration.
TINY = dict(hidden_sizes=(5,), meta_batch=3, traj_per_task=4, horizon=6, dtype="float64")
TINY_FLAGS = ["--hidden-sizes", "8", "--meta-batch", "3", "--traj-per-task", "4", "--horizon", "10",
              "--eval-tasks", "4", "--eval-traj", "3", "--pretrain-iterations", "1", "--no-progress"]


# ---------------------------------------------------------------- environments

def test_nav2d_reward_clipping_and_termination():
    env = Nav2D(torch.tensor([[0.15, 0.0]], dtype=D), num_envs=1, horizon=10)
    obs, _ = env.reset()
    assert obs.tolist() == [[[0.0, 0.0]]]
    # the action is clipped to 0.1: the point moves to (0.1, 0), 0.05 from the goal
    obs, r, term, trunc, info = env.step(torch.tensor([[[0.5, 0.0]]], dtype=D))
    assert obs[0, 0].tolist() == pytest.approx([0.1, 0.0])
    assert r.item() == pytest.approx(-0.05)
    assert not term.item() and not trunc.item() and info["active"].item()
    # within 0.01 of the goal on both coordinates: terminated, reward −distance
    obs, r, term, trunc, info = env.step(torch.tensor([[[0.05, 0.005]]], dtype=D))
    assert r.item() == pytest.approx(-0.005)
    assert term.item() and not trunc.item()
    # a finished copy stays put and earns nothing
    obs2, r, term, trunc, info = env.step(torch.tensor([[[0.1, 0.1]]], dtype=D))
    assert torch.equal(obs2, obs) and r.item() == 0.0 and not info["active"].item() and not term.item()


def test_nav2d_action_scale():
    # action_scale 10: the policy's action 0.5 is a move of 0.05; 5.0 is clipped to the 0.1 limit
    env = Nav2D(torch.tensor([[0.3, 0.3]], dtype=D), num_envs=1, horizon=10, action_scale=10.0)
    env.reset()
    obs, r, *_ = env.step(torch.tensor([[[0.5, 5.0]]], dtype=D))
    assert obs[0, 0].tolist() == pytest.approx([0.05, 0.1])
    assert r.item() == pytest.approx(-math.hypot(0.25, 0.2))
    assert RLConfig(env="cheetah-vel", action_scale=1).env_action_scale == 1.0


def test_nav2d_default_action_scale_is_rllab_normalize():
    # The paper's code runs the point env under rllab's ``normalize``: a policy action a in [-1, 1] moves
    # lb + (a + 1)/2 (ub − lb) = 0.1 a, clipped to ±0.1. With the old default (1) a σ = 1 policy was clipped
    # almost always and its mean could drift past the clip, where an inner step no longer moves the agent.
    cfg = RLConfig()
    assert cfg.env_action_scale == 10.0 and RLConfig(env="cheetah-dir").env_action_scale == 10.0
    env = make_env("nav2d", torch.zeros(1, 2, dtype=D), 1, 1, cfg.env_action_scale)
    for a in (-1.0, -0.3, 0.0, 0.7, 1.0, 2.5):
        env.reset()
        obs, *_ = env.step(torch.tensor([[[a, -a]]], dtype=D))
        lb, ub = -0.1, 0.1
        want = min(max(lb + (a + 1) * 0.5 * (ub - lb), lb), ub)
        assert obs[0, 0].tolist() == pytest.approx([want, -want])
    # the initial policy (σ = 1, mean ≈ 0) is clipped on P(|N(0, 1)| > 1) ≈ 32% of coordinates, not on
    # P(|N(0, 1)| > 0.1) ≈ 92% as with scale 1: its samples carry information about the goal
    policy = build_policy(2, 2, (8,), 1.0, 0, D)
    for scale, lo, hi in ((10.0, 0.40, 0.60), (1.0, 0.97, 1.0)):  # any of 2 coordinates: 1 − 0.68², 1 − 0.08²
        algo = MAMLTRPO(policy, cfg.replace(action_scale=scale, dtype="float64", traj_per_task=50))
        ep = algo.sample(torch.zeros(4, 2, dtype=D), dict(policy.named_parameters()), False,
                         torch.Generator().manual_seed(0))
        assert lo < algo.clip_fraction(ep) < hi


def test_new_runs_store_the_resolved_action_scale_and_old_defaults_load(tmp_path):
    from mamlkit.rl import train

    trainer = train.new_trainer(RLConfig(**TINY, iterations=1, progress=False), tmp_path)
    assert trainer.cfg.action_scale == 10.0  # explicit in the checkpoint, not "the default"
    train.save_checkpoint(trainer, tmp_path / "new.safetensors")
    assert train.load_trainer(tmp_path / "new.safetensors").cfg.env_action_scale == 10.0
    # a checkpoint that stored 0 (the default) was written when nav2d's default was 1
    tensors = {f"meta/{k}": v for k, v in trainer.policy.named_parameters()}
    cfg = trainer.cfg.to_dict() | {"action_scale": 0.0}
    checkpoint.save(tmp_path / "old0.safetensors", tensors, {"kind": "rl", "config": cfg, "step": 3})
    assert train.load_trainer(tmp_path / "old0.safetensors").cfg.env_action_scale == 1.0


def test_meta_batch_defaults_to_the_papers_per_env_and_runs_store_it(tmp_path, cli, capsys):
    # App. A.2: 20 tasks per meta-iteration for 2D navigation, 40 for the locomotion problems
    assert [RLConfig(env=e).tasks_per_batch for e in ("nav2d", "cheetah-vel", "cheetah-dir")] == [20, 40, 40]
    assert RLConfig(env="cheetah-dir", meta_batch=7).tasks_per_batch == 7
    from mamlkit.rl import train

    tiny = {k: v for k, v in TINY.items() if k != "meta_batch"}
    trainer = train.new_trainer(RLConfig(env="cheetah-dir", **tiny, iterations=1), tmp_path)
    assert trainer.cfg.meta_batch == 40  # explicit in the checkpoint, not "the default"
    from mamlkit.cli import main

    with pytest.raises(SystemExit) as help_exit:
        main(["rl", "train", "cheetah-dir", "--help"])
    assert help_exit.value.code == 0 and "40 cheetah) [cheetah-dir: 40]" in " ".join(capsys.readouterr().out.split())
    code, _, err = cli("rl", "train", "nav2d", "--meta-batch", "-1")
    assert code == 2 and "meta_batch must be >= 0" in err


def test_nav2d_truncation_at_horizon():
    env = Nav2D(torch.tensor([[0.5, 0.5], [-0.5, 0.2]], dtype=D), num_envs=3, horizon=3)
    env.reset()
    for t in range(3):
        obs, r, term, trunc, info = env.step(torch.full((2, 3, 2), -0.2, dtype=D))
        assert trunc.all() == (t == 2) and not term.any()
    # after 3 steps of (−0.1, −0.1) the distance to (0.5, 0.5) is |(−0.8, −0.8)|
    assert r[0, 0].item() == pytest.approx(-0.8 * math.sqrt(2))


def test_tasks_and_rollouts_are_deterministic():
    a = sample_tasks("nav2d", 5, task_generator(0, "train", 3))
    b = sample_tasks("nav2d", 5, task_generator(0, "train", 3))
    c = sample_tasks("nav2d", 5, task_generator(0, "train", 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 2) and a.abs().max() <= 0.5
    policy = build_policy(2, 2, (5,), 1.0, seed=0, dtype=D)
    fn = sampling.policy_fn(policy, dict(policy.named_parameters()), per_task=False)
    eps = [sampling.rollout(Nav2D(a, 4, 7), fn, torch.Generator().manual_seed(s), D) for s in (1, 1, 2)]
    assert eps[0].obs.shape == (5, 4, 7, 2) and eps[0].rewards.shape == (5, 4, 7)
    assert torch.equal(eps[0].actions, eps[1].actions) and torch.equal(eps[0].rewards, eps[1].rewards)
    assert not torch.equal(eps[0].actions, eps[2].actions)
    # rewards are −distance of the next position to the goal, positions integrate clipped actions
    nxt = eps[0].obs[:, :, 0] + eps[0].actions[:, :, 0].clamp(-0.1, 0.1)
    assert torch.allclose(eps[0].rewards[:, :, 0], -(nxt - a[:, None]).norm(dim=-1))



class _Flagging(Nav2D):
    """nav2d that reports success (as Meta-World does) at fixed steps of fixed copies: copy (0, 0) at step 1,
    copy (1, 2) at step 2, but copy (1, 1) only after its episode ended (which must not count)."""

    def reset(self, *, seed=None):
        self.k = 0
        return super().reset(seed=seed)

    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        self.k += 1
        flag = torch.zeros(2, 3, dtype=D)
        active = torch.ones(2, 3, dtype=torch.bool)
        if self.k == 1:
            flag[0, 0] = 1.0
        if self.k == 2:
            flag[1, 2] = 1.0
        if self.k >= 2:
            active[1, 1] = False
            flag[1, 1] = 1.0
        return obs, r, term, trunc, {**info, "active": active & info["active"], "success": flag}


def test_rollouts_record_success_where_the_environment_reports_it():
    goals = torch.tensor([[0.5, 0.5], [-0.5, 0.2]], dtype=D)
    policy = build_policy(2, 2, (5,), 1.0, seed=0, dtype=D)
    fn = sampling.policy_fn(policy, dict(policy.named_parameters()), per_task=False)
    ep = sampling.rollout(_Flagging(goals, 3, 4), fn, torch.Generator().manual_seed(0), D)
    assert ep.success.tolist() == [[True, False, False], [False, False, True]]
    assert sampling.rollout(Nav2D(goals, 3, 4), fn, torch.Generator().manual_seed(0), D).success is None


# ---------------------------------------------------------------- baseline and GAE

def test_returns_and_gae_hand_computed():
    # 3 valid steps, then one invalid step whose reward and value must be ignored
    r = torch.tensor([[1.0, 2.0, 3.0, 7.0]], dtype=D)
    v = torch.tensor([[0.5, 1.0, 1.5, 9.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert discounted_returns(r, m, 0.9)[0].tolist() == pytest.approx([5.23, 4.7, 3.0, 0.0])
    # δ = (1.4, 2.35, 1.5); A2 = 1.5, A1 = 2.35 + 0.72·1.5, A0 = 1.4 + 0.72·A1
    assert gae(r, v, m, 0.9, 0.8)[0].tolist() == pytest.approx([3.8696, 3.43, 1.5, 0.0])
    # λ = 1: returns minus the baseline
    assert gae(r, v, m, 0.9, 1.0)[0].tolist() == pytest.approx([4.73, 3.7, 1.5, 0.0])
    n = normalize(torch.tensor([[[1.0, 2.0, 3.0, 50.0]]], dtype=D), m[None])
    assert n[0, 0].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], abs=1e-6)


def test_linear_baseline_features_and_fit():
    obs = torch.tensor([[[0.5], [-2.0], [20.0]]], dtype=D)  # [N=1, H=3, d=1]
    f = baseline_features(obs)
    assert torch.allclose(f[0], torch.tensor([[0.5, 0.25, 0.0, 0.0, 0.0, 1.0],
                                              [-2.0, 4.0, 0.01, 1e-4, 1e-6, 1.0],
                                              [10.0, 100.0, 0.02, 4e-4, 8e-6, 1.0]], dtype=D))
    # targets that are an exact linear function of the features are fitted exactly; masked
    # steps (given absurd targets) do not count
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(2, 5, 30, 2, generator=g, dtype=D)
    feats = baseline_features(obs)
    w = torch.randn(2, feats.shape[-1], generator=g, dtype=D)
    y = torch.einsum("tnhf,tf->tnh", feats, w)
    mask = torch.ones(2, 5, 30, dtype=torch.bool)
    mask[:, :, 25:] = False
    y[~mask] = 1e3
    coef = fit_linear_baseline(feats, y, mask, reg=1e-10)
    assert torch.allclose(coef, w, atol=1e-5)


# ---------------------------------------------------------------- conjugate gradient and Fisher

def test_conjugate_gradient_matches_direct_solve():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))[0]
    A = Q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0, 13.0], dtype=D)) @ Q.T
    b = torch.randn(6, generator=g, dtype=D)
    x = conjugate_gradient(lambda v: A @ v, b, iters=10)
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-10)
    # with fewer iterations than distinct eigenvalues the residual is not yet zero
    assert (A @ conjugate_gradient(lambda v: A @ v, b, iters=2) - b).norm() > 1e-3
    # the product A x that TRPO's step length needs comes from the products CG made, without another one
    calls = []

    def product(v):
        calls.append(v)
        return A @ v

    for iters in (2, 10):
        calls.clear()
        x, Ax = solve_cg(product, b, iters=iters)
        assert torch.allclose(Ax, A @ x, atol=1e-12) and len(calls) == min(iters, 6)


def _tiny_batch(first_order: bool = False, seed: int = 0):
    cfg = RLConfig(**TINY, first_order=first_order, seed=seed)
    policy = build_policy(2, 2, cfg.hidden_sizes, 0.5, seed=seed, dtype=D)
    with torch.no_grad():  # nonzero biases: with zero biases every ReLU sits on its kink at the start state
        for name, p in policy.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=D))
    algo = MAMLTRPO(policy, cfg)
    gen = task_generator(seed, "train", 0)
    batch, _ = algo.collect(sample_tasks("nav2d", cfg.meta_batch, gen), gen)
    return cfg, policy, algo, batch


def _explicit_fisher(cfg, policy, batch, first_order: bool) -> torch.Tensor:
    """Σ_tasks mean_states Jᵀ M J / T, J = d(post-update mean, log σ)/dθ, M = diag(1/σ², 2): written
    out by hand (inner step by autograd.grad, Jacobian by autograd.functional.jacobian)."""
    names = [k for k, _ in policy.named_parameters()]
    theta0 = flat([p.detach() for p in policy.parameters()])
    shapes = [p.shape for p in policy.parameters()]

    def unflat(v):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    a = 2
    F = torch.zeros(theta0.numel(), theta0.numel(), dtype=D)
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]

        def post_dist(v, sx=sx, sy=sy, qx=qx):
            p = unflat(v)
            out = torch.func.functional_call(policy, p, (sx,))
            m = sy[:, a + 1]
            inner = -(log_prob(out, sy[:, :a]) * sy[:, a] * m).sum() / m.sum()
            grads = torch.autograd.grad(inner, list(p.values()), create_graph=not first_order)
            fast = {k: p[k] - cfg.inner_lr * g for k, g in zip(names, grads)}
            return torch.func.functional_call(policy, fast, (qx,))

        J = torch.autograd.functional.jacobian(post_dist, theta0, vectorize=True)  # [M, 2a, n]
        out = post_dist(theta0.clone().requires_grad_()).detach()
        mask = qy[:, a + 1]
        M = torch.cat([torch.exp(-2 * out[:, a:]), torch.full_like(out[:, a:], 2.0)], dim=-1) * mask[:, None]
        F += torch.einsum("mon,mo,mok->nk", J, M, J) / mask.sum()
    return F / batch.num_tasks


@pytest.mark.parametrize("first_order", [False, True])
def test_fisher_vector_product_matches_explicit_fisher(first_order):
    cfg, policy, algo, batch = _tiny_batch(first_order)
    params = list(policy.parameters())
    _, kl = algo.losses(batch)
    assert abs(kl.item()) < 1e-12  # the KL to the sampling policy vanishes at θ_old
    fvp = fisher_vector_product(kl, params)
    n = sum(p.numel() for p in params)
    H = torch.stack([fvp(e) for e in torch.eye(n, dtype=D)])
    F = _explicit_fisher(cfg, policy, batch, first_order)
    assert torch.allclose(H, H.T, atol=1e-10)
    assert torch.allclose(H, F, rtol=1e-7, atol=1e-10)
    task_by_task = algo.linearize(batch).fvp
    assert torch.allclose(torch.stack([task_by_task(e) for e in torch.eye(n, dtype=D)]), F, rtol=1e-7, atol=1e-10)
    assert torch.linalg.eigvalsh(F).min() > -1e-10


def _random_vectors(n: int, k: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, generator=g, dtype=D) for _ in range(k)]


@pytest.mark.parametrize("estimator, first_order, algo_name", [
    ("reinforce", False, "maml-trpo"), ("lvc", False, "maml-trpo"), ("dice", False, "maml-trpo"),
    ("reinforce", True, "maml-trpo"), ("reinforce", False, "pretrain")])
def test_task_by_task_linearization_equals_autograd_on_the_whole_objective(estimator, first_order, algo_name):
    # MAMLTRPO.linearize (per task: Jᵀ∇S for the gradient, J·GaussNewton·J for the Fisher) against the
    # reference: autograd's gradient of the vmapped surrogate and Hessian of the vmapped KL (Pearlmutter)
    cfg, policy, _, batch = _tiny_batch(first_order)
    cfg = cfg.replace(estimator=estimator, algo=algo_name, inner_steps=int(algo_name == "maml-trpo"))
    algo = MAMLTRPO(policy, cfg)
    if algo_name == "pretrain":
        gen = task_generator(0, "train", 0)
        batch, _ = algo.collect(sample_tasks("nav2d", cfg.meta_batch, gen), gen)
    ref = autograd_linearization(list(policy.parameters()), lambda: algo.losses(batch))
    fast = algo.linearize(batch)
    assert fast.loss.item() == pytest.approx(ref.loss.item(), abs=1e-15)
    assert torch.allclose(fast.grad, ref.grad, rtol=1e-12, atol=1e-15) and ref.grad.norm() > 1e-3
    for v in _random_vectors(ref.grad.numel()):
        want = ref.fvp(v)
        assert torch.allclose(fast.fvp(v), want, rtol=1e-11, atol=1e-14 * want.norm().item())


def test_task_by_task_fisher_is_the_kl_hessian_by_finite_differences():
    # F v = (∇KL(θ + εv) − ∇KL(θ − εv)) / 2ε, ∇KL by autograd through the inner step at the shifted θ
    # (exact second order only: the first-order Fisher is the Hessian with J = I by definition, not the KL's)
    _, policy, algo, batch = _tiny_batch(False)
    params = list(policy.parameters())
    theta = flat([p.detach() for p in params])
    fvp = algo.linearize(batch).fvp
    from mamlkit.rl.trpo import set_flat
    for v in _random_vectors(theta.numel(), 2):
        grads, eps = [], 1e-5
        for s in (1, -1):
            set_flat(params, theta + s * eps * v)
            grads.append(flat(torch.autograd.grad(algo.losses(batch)[1], params)))
        set_flat(params, theta)
        fd = (grads[0] - grads[1]) / (2 * eps)
        assert torch.allclose(fvp(v), fd, rtol=1e-6, atol=1e-8 * fd.norm().item())


def test_task_by_task_fisher_on_a_subset_and_the_checks():
    # --fisher-tasks / --fisher-fraction: the Fisher of the sub-batch's KL, the loss and gradient of the batch
    cfg, policy, algo, batch = _tiny_batch(False)
    gen = torch.Generator().manual_seed(0)
    sub = MAMLTRPO(policy, cfg.replace(fisher_tasks=2, fisher_fraction=0.3)).fisher_batch(batch, gen)
    assert sub.num_tasks == 2 and sub.query_x.shape[1] < batch.query_x.shape[1]
    params = list(policy.parameters())
    ref = autograd_linearization(params, lambda: algo.losses(batch), fisher_kl=lambda: algo.losses(sub)[1])
    fast = algo.linearize(batch, sub)
    assert torch.allclose(fast.grad, ref.grad, rtol=1e-12, atol=1e-15)
    for v in _random_vectors(ref.grad.numel()):
        assert torch.allclose(fast.fvp(v), ref.fvp(v), rtol=1e-11, atol=1e-14 * ref.fvp(v).norm().item())
    with pytest.raises(ValueError, match="fisher_kl or linearize"):
        trpo_step(params, lambda: algo.losses(batch), fisher_kl=lambda: algo.losses(sub)[1],
                  linearize=lambda: fast)
    from mamlkit.rl.maml_trpo import linearize_tasks, pg_loss
    with pytest.raises(ValueError, match="at most one inner step"):
        linearize_tasks(policy, batch, None, loss_fn=pg_loss(2), lr=0.1, steps=2, first_order=False, act_dim=2)


@pytest.mark.parametrize("overrides", [{}, {"fisher_fraction": 1.0}, {"fisher_fraction": 0.5}])
def test_meta_step_is_the_same_with_and_without_fast_fisher(overrides):
    # the whole meta-iteration (sampling, CG step, line search) lands on the same parameters either way.
    # Damping 0.1 and 5 CG iterations: with the default 1e-5 and 10 iterations on this 29-parameter policy,
    # whose Fisher is singular, CG's iterate changes by ~5% under a 1e-15 relative perturbation of the
    # products (of the reference route itself), which no comparison of two routes can get below.
    results = []
    for fast_fisher in (True, False):
        cfg = RLConfig(**TINY, fast_fisher=fast_fisher, cg_damping=0.1, cg_iters=5, **overrides)
        policy = build_policy(2, 2, cfg.hidden_sizes, 0.5, seed=3, dtype=D)
        algo = MAMLTRPO(policy, cfg)
        for it in range(2):
            gen = task_generator(3, "train", it)
            stats = algo.meta_step(sample_tasks("nav2d", cfg.meta_batch, gen), gen)
        results.append((flat([p.detach() for p in policy.parameters()]), stats))
    (p_fast, s_fast), (p_ref, s_ref) = results
    assert s_ref["backtracks"] < 15 and s_ref["kl"] > 0
    assert s_fast["backtracks"] == s_ref["backtracks"]
    assert s_fast["kl"] == pytest.approx(s_ref["kl"], rel=1e-9)
    assert torch.allclose(p_fast, p_ref, rtol=1e-10, atol=1e-12)


def test_fisher_goes_through_the_inner_step():
    # second and first order differ: the FVP contains the inner step's Jacobian (I − α∇²L)
    _, p2, algo2, batch = _tiny_batch(False)
    _, p1, algo1, _ = _tiny_batch(True)
    v = torch.linspace(-1, 1, sum(p.numel() for p in p2.parameters()), dtype=D)
    f2 = fisher_vector_product(algo2.losses(batch)[1], list(p2.parameters()))(v)
    f1 = fisher_vector_product(algo1.losses(batch)[1], list(p1.parameters()))(v)
    assert (f2 - f1).norm() > 1e-3 * f1.norm()


def test_meta_gradient_matches_finite_differences():
    _, policy, algo, batch = _tiny_batch(False)
    params = list(policy.parameters())
    loss, _ = algo.losses(batch)
    g = flat(torch.autograd.grad(loss, params))
    direction = torch.randn(g.numel(), generator=torch.Generator().manual_seed(1), dtype=D)
    theta = flat([p.detach() for p in params])
    eps, vals = 1e-5, []
    from mamlkit.rl.trpo import set_flat
    for s in (1, -1):
        set_flat(params, theta + s * eps * direction)
        with torch.no_grad():
            vals.append(algo.losses(batch)[0].item())
    set_flat(params, theta)
    assert (vals[0] - vals[1]) / (2 * eps) == pytest.approx((g @ direction).item(), rel=1e-6)


# ---------------------------------------------------------------- meta-gradient estimators (--estimator)

def _linear_gaussian_meta_gradients(estimators, horizon: int, num_traj: int, batches: int):
    """Expected meta-gradient of each inner-loss estimator on a linear-Gaussian problem, and the truth.

    Policy a_t ~ N(θ, 1) (scalar θ, the "pred" [θ, log σ = 0] of every step), goal g = 1, γ = 1,
    rewards r_1 = −(a_1 − g)² and, with horizon 2, r_2 = −(a_1 + a_2 − 2g)² (depends on both actions, so
    the cross-time terms of the Hessian matter). Post-update objective in closed form,
    J(θ) = E[Σ r] = −(θ − g)² − 1 (H = 1) or −5(θ − g)² − 3 (H = 2); advantages: rewards to go.
    Each estimate: θ' = θ − α∇L_inner over ``num_traj`` episodes, meta-gradient dJ(θ')/dθ by autograd,
    averaged over ``batches`` independent batches. The truth is the central finite difference of
    J(θ + α ĝ(θ)) with the inner gradient ĝ from 200,000 episodes under common random numbers.
    """
    from mamlkit.rl.maml_trpo import pg_loss

    g, alpha, theta0, H = 1.0, 0.1, 0.0, horizon

    def rewards(a):
        r = [-(a[..., 0] - g) ** 2] + ([-(a[..., 0] + a[..., 1] - 2 * g) ** 2] if H == 2 else [])
        return torch.stack(r, -1)

    def to_go(a):
        return rewards(a).flip(-1).cumsum(-1).flip(-1)

    def J(th):
        return -(th - g) ** 2 - 1 if H == 1 else -5 * (th - g) ** 2 - 3

    eps = torch.randn(200_000, H, generator=torch.Generator().manual_seed(0), dtype=D)

    def at_expected_step(th):  # the loss's inner step: mean over all N·H steps of ∇log π·A
        return J(th + alpha * ((eps) * to_go(th + eps)).sum(-1).mean() / H)

    h = 1e-4
    truth = ((at_expected_step(torch.tensor(theta0 + h, dtype=D))
              - at_expected_step(torch.tensor(theta0 - h, dtype=D))) / (2 * h)).item()
    eps = torch.randn(batches, num_traj, H, generator=torch.Generator().manual_seed(1), dtype=D)
    M = num_traj * H
    y = torch.cat([(theta0 + eps).reshape(batches, M, 1), to_go(theta0 + eps).reshape(batches, M, 1),
                   torch.ones(batches, M, 1, dtype=D)], -1)
    out, inner = {}, {}
    for est in estimators:
        th = torch.full((batches,), theta0, dtype=D, requires_grad=True)
        pred = torch.stack([th[:, None].expand(batches, M), torch.zeros(batches, M, dtype=D)], -1)
        grad, = torch.autograd.grad(torch.vmap(pg_loss(1, est, H))(pred, y).sum(), th, create_graph=True)
        meta, = torch.autograd.grad(J(th - alpha * grad).sum(), th)
        out[est] = (meta.mean().item(), 1.96 * meta.std().item() / batches ** 0.5)
        inner[est] = grad.detach()
    return truth, out, inner


def test_estimators_have_the_same_inner_gradient_and_lvc_dice_match_the_meta_gradient():
    # One step (a bandit): LVC and DiCE coincide and their expected meta-gradient is close to the truth
    # J'(θ + α∇J)(1 + α∇²J) = 1.6 · 0.8 = 1.28 at θ = 0; REINFORCE's Hessian E[A ∇²log π] = −E[A] = +2
    # has the wrong sign (the true one is −2), and its meta-gradient is far off.
    truth, est, inner = _linear_gaussian_meta_gradients(("reinforce", "lvc", "dice"), 1, 100, 2000)
    assert truth == pytest.approx(1.6 * 0.8, rel=5e-3)
    assert torch.allclose(inner["lvc"], inner["reinforce"], rtol=1e-12)
    assert torch.allclose(inner["dice"], inner["reinforce"], rtol=1e-12)
    assert est["lvc"][0] == pytest.approx(est["dice"][0], rel=1e-12)
    err = {k: abs(m - truth) for k, (m, _) in est.items()}
    assert err["lvc"] < 0.1 * err["reinforce"] and err["lvc"] < 0.05
    # Two steps whose second reward depends on both actions: only DiCE has the cross-time Hessian terms.
    # Measured (200 episodes x 2000 batches): truth 2.503, reinforce 8.47 ± 0.05, lvc 3.62 ± 0.05,
    # dice 2.68 ± 0.06 (the rest of DiCE's gap is the O(1/N) covariance of θ' and the Hessian estimate).
    # One step, 100 episodes: truth 1.278, reinforce 1.920 ± 0.004, lvc = dice 1.296 ± 0.011.
    truth, est, inner = _linear_gaussian_meta_gradients(("reinforce", "lvc", "dice"), 2, 200, 2000)
    assert truth == pytest.approx(5 * 0.5, rel=1e-2)  # J'(0.5)·(1 − α·5) with J = −5(θ − 1)² − 3, /H in ĝ
    assert torch.allclose(inner["dice"], inner["reinforce"], rtol=1e-10)
    err = {k: abs(m - truth) for k, (m, _) in est.items()}
    assert err["dice"] + est["dice"][1] < err["lvc"] - est["lvc"][1]
    assert err["lvc"] + est["lvc"][1] < err["reinforce"] - est["reinforce"][1]
    assert err["dice"] < 0.1 * err["reinforce"]


@pytest.mark.parametrize("estimator", ["lvc", "dice"])
def test_estimator_in_maml_trpo_changes_only_the_second_order(estimator):
    # same surrogate value and KL at θ_old (same inner step), a different meta-gradient; the
    # meta-gradient of each estimator is the finite difference of its own objective
    _, policy, algo, batch = _tiny_batch(False)
    params = list(policy.parameters())
    loss_r, _ = algo.losses(batch)
    g_r = flat(torch.autograd.grad(loss_r, params))
    other = MAMLTRPO(policy, algo.cfg.replace(estimator=estimator))
    loss_e, kl_e = other.losses(batch)
    assert loss_e.item() == pytest.approx(loss_r.item(), rel=1e-10) and abs(kl_e.item()) < 1e-12
    g_e = flat(torch.autograd.grad(loss_e, params))
    assert (g_e - g_r).norm() > 1e-3 * g_r.norm()
    fo = MAMLTRPO(policy, algo.cfg.replace(estimator=estimator, first_order=True)).losses(batch)[0]
    g_fo = flat(torch.autograd.grad(fo, params))
    assert torch.allclose(g_fo, flat(torch.autograd.grad(
        MAMLTRPO(policy, algo.cfg.replace(first_order=True)).losses(batch)[0], params)), atol=1e-12)


def test_fisher_fraction_subsamples_query_states_only():
    cfg, policy, algo, batch = _tiny_batch(False)
    assert cfg.fisher_fraction == 0.2  # the default: a fifth of the states, as common TRPO code
    full = MAMLTRPO(policy, cfg.replace(fisher_fraction=1.0))
    assert full.fisher_batch(batch, torch.Generator().manual_seed(0)) is None  # fraction 1: the whole batch
    sub_algo = MAMLTRPO(policy, cfg.replace(fisher_fraction=0.2))
    sub = sub_algo.fisher_batch(batch, torch.Generator().manual_seed(0))
    m = batch.query_x.shape[1]
    assert sub.query_x.shape[1] == math.ceil(0.2 * m) and torch.equal(sub.support_x, batch.support_x)
    # the chosen states are the same for every task, and the KL still vanishes at θ_old
    keep = torch.randperm(m, generator=torch.Generator().manual_seed(0))[:sub.query_x.shape[1]]
    assert torch.equal(sub.query_y, batch.query_y[:, keep])
    assert abs(sub_algo.losses(sub)[1].item()) < 1e-12
    params = list(policy.parameters())
    stats = trpo_step(params, lambda: algo.losses(batch), max_kl=1e-3, fisher_kl=lambda: sub_algo.losses(sub)[1])
    with torch.no_grad():
        assert algo.losses(batch)[1].item() <= 1e-3  # the line search checks the full KL
    assert stats["backtracks"] < 15


# ------------------------------------- MAML-TRPO against the paper's code and pytorch-maml-rl, point by point

def _perturbed(policy, scale=0.05, seed=5):
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=D))


def test_importance_ratio_uses_the_sampling_policy_and_kl_is_old_to_new_over_post_update_states():
    # The paper's code (maml_npo.py) and pytorch-maml-rl both divide by the post-update policy that
    # sampled the query episodes (the old θ'), fixed during the line search, and constrain the mean
    # KL(π_old ‖ π_new) (rllab's kl_sym(old, new); pytorch-maml-rl uses KL(new ‖ old), the same to
    # second order) over the valid post-update states. Hand computation per task, then mean over tasks.
    cfg, policy, algo, batch = _tiny_batch(False)
    a = 2
    old = batch.query_y[..., a + 2:]
    with torch.no_grad():  # the recorded sampling distribution is the one θ' gives now: ratio 1, KL 0
        loss0, kl0 = algo.losses(batch)
        mask = batch.query_y[..., a + 1]
        adv = batch.query_y[..., a]
        assert loss0.item() == pytest.approx(-((adv * mask).sum(1) / mask.sum(1)).mean().item(), abs=1e-12)
        assert abs(kl0.item()) < 1e-12
    _perturbed(policy)
    params = {k: v.detach() for k, v in policy.named_parameters()}
    with torch.no_grad():
        loss1, kl1 = algo.losses(batch)
        sx, sy = batch.support_x, batch.support_y
        from mamlkit.rl.maml_trpo import adapt_tasks
        fast = adapt_tasks(policy, params, sx, sy, cfg.inner_lr, per_task=False)
        new = torch.vmap(lambda p, x: torch.func.functional_call(policy, p, (x,)))(fast, batch.query_x)
        ratio = torch.exp(log_prob(new, batch.query_y[..., :a]) - log_prob(old, batch.query_y[..., :a]))
        want_loss = -((ratio * adv * mask).sum(1) / mask.sum(1)).mean()
        want_kl = ((kl_divergence(old, new) * mask).sum(1) / mask.sum(1)).mean()
        reverse = ((kl_divergence(new, old) * mask).sum(1) / mask.sum(1)).mean()
    assert loss1.item() == pytest.approx(want_loss.item(), rel=1e-9)
    assert kl1.item() == pytest.approx(want_kl.item(), rel=1e-9)
    assert abs(kl1.item() - reverse.item()) > 1e-6 * kl1.item()  # the direction is pinned, not incidental
    assert 0.5 < kl1.item() / reverse.item() < 2  # and it agrees with the other to leading order


def test_baseline_is_refit_on_each_batch_and_advantages_normalised_per_task():
    # Both references fit the linear feature baseline on the very episodes whose advantages it gives
    # (rllab's process_samples in the paper's code fits, then predicts; pytorch-maml-rl's sampler
    # calls baseline.fit(episodes) before compute_advantages), per task, and then normalise the
    # advantages per task over the valid steps (rllab center_adv, pytorch-maml-rl normalize=True).
    cfg = RLConfig(**TINY)
    algo = MAMLTRPO(build_policy(2, 2, (5,), 1.0, 0, D), cfg)
    gen = task_generator(0, "train", 0)
    tasks = sample_tasks("nav2d", 3, gen)
    ep1 = algo.sample(tasks, dict(algo.model.named_parameters()), False, gen)
    ep2 = algo.sample(tasks, dict(algo.model.named_parameters()), False, gen)
    adv_alone = sampling.advantages(ep2, cfg.gamma, cfg.gae_lambda)
    sampling.advantages(ep1, cfg.gamma, cfg.gae_lambda)  # a previous batch leaves no state behind
    adv = sampling.advantages(ep2, cfg.gamma, cfg.gae_lambda)
    assert torch.equal(adv, adv_alone)
    feats = baseline_features(ep2.obs)
    coef = fit_linear_baseline(feats, discounted_returns(ep2.rewards, ep2.mask, cfg.gamma), ep2.mask)
    values = torch.einsum("tnhf,tf->tnh", feats, coef)
    raw = gae(ep2.rewards, values, ep2.mask, cfg.gamma, cfg.gae_lambda)
    m = ep2.mask.to(D)
    n = m.sum((1, 2))
    for t in range(3):
        valid = raw[t][ep2.mask[t]]
        want = (valid - valid.mean()) / (valid.var(unbiased=False).sqrt() + 1e-8)
        assert torch.allclose(adv[t][ep2.mask[t]], want, atol=1e-10)
        assert (adv[t][~ep2.mask[t]] == 0).all()
    assert torch.allclose((adv * m).sum((1, 2)) / n, torch.zeros(3, dtype=D), atol=1e-10)


def test_line_search_needs_improvement_and_kl_within_the_bound():
    # rllab's ConjugateGradientOptimizer (the paper's code) and pytorch-maml-rl accept a backtracked step
    # only if the surrogate improves AND the mean KL is within δ, and restore θ_old if none qualifies.
    g = torch.tensor([1.0, -2.0], dtype=D)

    def run(loss_fn, kl_fn):
        p = torch.zeros(2, dtype=D, requires_grad=True)
        stats = trpo_step([p], lambda: (loss_fn(p), kl_fn(p)), max_kl=0.01, damping=0.0)
        return p.detach(), stats

    quad_kl = lambda p: 0.5 * (p * p).sum()  # noqa: E731  (Fisher I)
    # the KL grows faster than its quadratic model: the full step (KL 0.01 predicted) is too far
    p, stats = run(lambda p: -(g * p).sum(), lambda p: quad_kl(p) + 50 * (p * p).sum() ** 2)
    assert stats["backtracks"] > 0 and 0 < stats["kl"] <= 0.01 and p.norm() > 0
    # every trial step makes the loss worse: rejected, θ restored, although every KL is within δ
    p, stats = run(lambda p: -(g * p).sum() + 1e4 * (p * p).sum(), quad_kl)
    assert stats["backtracks"] == 15 and torch.equal(p, torch.zeros(2, dtype=D)) and stats["kl"] == 0.0
    # the loss improves everywhere but the KL exceeds δ at every trial step: rejected as well
    p, stats = run(lambda p: -(g * p).sum(), lambda p: quad_kl(p) + 1e9 * (p * p).sum() ** 2)
    assert stats["backtracks"] == 15 and torch.equal(p, torch.zeros(2, dtype=D))


def test_the_executors_loop_gives_vmaps_numbers(monkeypatch):
    """Every per-task piece of MAML-TRPO runs on its executor: the post-update policies' sampling, the inner
    step, the surrogate and KL (collect, losses, the meta-gradient) and the test-time adaptation. Under the
    loop they run task by task, and give vmap's numbers (float64)."""
    from mamlkit.exec import strategies
    from mamlkit.exec.executor import Executor

    cfg = RLConfig(**TINY)
    tasks = sample_tasks("nav2d", cfg.meta_batch, task_generator(0, "train", 0))
    seen, real_map, real_tasks = [], strategies.map_args, strategies.map_tasks
    monkeypatch.setattr(strategies, "map_args", lambda *a, **k: seen.append(k["vectorize"]) or real_map(*a, **k))
    monkeypatch.setattr(strategies, "map_tasks",
                        lambda fn, b, s: seen.append(s.vectorize) or real_tasks(fn, b, s))
    out = {}
    for strategy in ("vmap", "loop"):
        seen.clear()
        policy = build_policy(2, 2, cfg.hidden_sizes, 0.5, seed=1, dtype=D)
        algo = MAMLTRPO(policy, cfg, executor=Executor(policy, strategy))
        gen = torch.Generator().manual_seed(4)
        batch, stats = algo.collect(tasks, gen)
        surr, kl = algo.losses(batch)
        grad = flat(torch.autograd.grad(surr, list(policy.parameters())))
        curve, path = algo.adapt_curve(tasks[:2], (0.1, 0.05), gen, 3)
        out[strategy] = [batch.support_y, batch.query_x, batch.query_y, surr, kl, grad, curve, *path[2].values(),
                         torch.tensor([stats["return_post"]], dtype=D)]
        # 18 rollout steps of post-update policies (6 in collect, 6 x 2 in adapt_curve), 3 inner
        # steps (collect's, adapt_curve's two), the objective once: all on this strategy
        assert len(seen) == 22 and set(seen) == {strategy == "vmap"}, seen
    for vmapped, looped in zip(out["vmap"], out["loop"]):
        assert vmapped.shape == looped.shape and torch.allclose(vmapped, looped, rtol=1e-10, atol=1e-12)
    assert not torch.equal(out["vmap"][5], torch.zeros_like(out["vmap"][5]))  # a meta-gradient to compare


def test_evaluation_steps_use_0_1_then_0_05():
    # Finn et al. 2017, App. A.2: trained with one step of α = 0.1, evaluated "halving the learning rate
    # after the first gradient step" (the paper's test_maml_point.py: init_learning_rate α, then 0.5 α).
    cfg = RLConfig(**TINY)
    assert cfg.eval_lrs == (0.1, 0.05, 0.05) and cfg.inner_lr == 0.1
    from mamlkit.rl.maml_trpo import adapt_tasks

    policy = build_policy(2, 2, (5,), 1.0, 0, D)
    algo = MAMLTRPO(policy, cfg)
    tasks = sample_tasks("nav2d", 2, task_generator(0, "test", 0))
    curve, path = algo.adapt_curve(tasks, cfg.eval_lrs, torch.Generator().manual_seed(3), 4)
    gen = torch.Generator().manual_seed(3)  # redo by hand with the same noise
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    ep = algo.sample(tasks, theta, False, gen, 4)
    p1 = adapt_tasks(policy, theta, *algo.pack(ep, False), 0.1, per_task=False)
    ep = algo.sample(tasks, p1, True, gen, 4)
    p2 = adapt_tasks(policy, p1, *algo.pack(ep, False), 0.05, per_task=True)
    assert curve.shape == (2, 4)
    for k in p2:
        assert torch.allclose(path[2][k], p2[k], atol=1e-12)


def test_test_batch_is_the_papers_4000_steps():
    # cbfinn/maml_rl's test_maml_point.py and test_maml_cheetah_direc.py sample batch_size=4000 steps per
    # test step: 40 episodes of 100 steps on nav2d, 20 of 200 on the half-cheetah
    assert RLConfig(env="nav2d").test_traj == 40
    assert RLConfig(env="cheetah-dir").test_traj == 20 and RLConfig(env="cheetah-vel", horizon=100).test_traj == 40
    assert RLConfig(env="nav2d", horizon=8000).test_traj == 1 and RLConfig(env="nav2d", eval_traj=7).test_traj == 7
    with pytest.raises(ConfigError, match="eval_traj must be >= 0"):
        RLConfig(eval_traj=-1)


def test_trpo_step_respects_trust_region():
    cfg, policy, algo, batch = _tiny_batch(False, seed=2)
    params = list(policy.parameters())
    before = flat([p.detach() for p in params]).clone()
    loss0, _ = algo.losses(batch)
    stats = trpo_step(params, lambda: algo.losses(batch), max_kl=1e-3, damping=1e-5)
    with torch.no_grad():
        loss1, kl1 = algo.losses(batch)
    assert stats["backtracks"] < 15
    assert 0 < kl1.item() <= 1e-3
    assert loss1.item() < loss0.item()
    assert stats["kl"] == pytest.approx(kl1.item()) and stats["loss"] == pytest.approx(loss1.item())
    assert not torch.equal(before, flat([p.detach() for p in params]))


def test_kl_and_log_prob_closed_forms():
    old = torch.tensor([[0.3, 0.0]], dtype=D)    # mean 0.3, log σ 0
    new = torch.tensor([[0.1, math.log(2.0)]], dtype=D)
    # KL(N(0.3, 1) ‖ N(0.1, 4)) = log 2 + (1 + 0.04)/8 − 1/2
    assert kl_divergence(old, new).item() == pytest.approx(math.log(2) + 1.04 / 8 - 0.5)
    lp = log_prob(old, torch.tensor([[1.3]], dtype=D)).item()
    assert lp == pytest.approx(-0.5 - 0.5 * math.log(2 * math.pi))


# ---------------------------------------------------------------- config and CLI

def test_config_rejects_bad_values_and_unknown_keys():
    with pytest.raises(ConfigError, match="Valid keys: env, algo"):
        from_dict({"env": "nav2d", "meta_batchh": 3})
    with pytest.raises(ConfigError, match="max_kl must be > 0"):
        RLConfig(max_kl=0.0)
    with pytest.raises(ConfigError, match="inner_steps must be 0 or 1"):
        RLConfig(inner_steps=2)


def test_cli_train_eval_and_resume(tmp_path, capsys):
    flags = ["--out-dir", str(tmp_path)] + TINY_FLAGS
    assert main(["rl", "train", "nav2d", "--iterations", "2", "--run-name", "full"] + flags) == 0
    run = tmp_path / "full"
    for name in ("checkpoint.safetensors", "config.json", "metrics.jsonl", "eval.md", "eval.json",
                 "figure4_trajectories.png", "returns_vs_steps.png", "pretrained/checkpoint.safetensors"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["kl"] <= 0.01 for r in rows)
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["returns"]) == {"maml-trpo", "pretrained", "random init"} and ev["num_tasks"] == 4
    for curve in ev["returns"].values():
        assert list(curve) == ["0", "1", "2", "3"]
        assert all(-10.5 < c["mean"] < 0 and math.isfinite(c["ci95"]) for c in curve.values())
    assert ev["paper"] == [-40.41, -11.68, -3.33, -3.23]
    out = capsys.readouterr().out
    assert "| 1 |" in out and "-11.68" in out

    assert main(["rl", "eval", str(run / "checkpoint.safetensors"), "--eval-tasks", "5", "--overwrite"]) == 0
    assert json.loads((run / "eval.json").read_text())["num_tasks"] == 5

    # resume: 1 iteration, then continue to 2 == 2 uninterrupted iterations, bit for bit
    half_run = tmp_path / "half"
    assert main(["rl", "train", "nav2d", "--iterations", "1", "--run-name", "half", "--no-baselines",
                 *flags]) == 0
    assert main(["rl", "train", "--resume", str(half_run), "--iterations", "2", "--no-baselines"]) == 0
    full, _ = checkpoint.load(run)
    half, state = checkpoint.load(tmp_path / "half")
    assert state["step"] == 2
    assert all(torch.equal(full[k], half[k]) for k in full)


def test_resuming_a_finished_run_says_so_and_writes_a_missing_report(tmp_path, capsys):
    flags = ["--out-dir", str(tmp_path), "--run-name", "r", "--no-baselines"] + TINY_FLAGS
    assert main(["rl", "train", "nav2d", "--iterations", "1"] + flags) == 0
    run = tmp_path / "r"
    made = {name: (run / name).stat().st_mtime_ns for name in ("eval.md", "checkpoint.safetensors")}
    capsys.readouterr()
    assert main(["rl", "train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is finished: 1 iterations trained, report in {run / 'eval.md'}: nothing to do" in out
    assert "--iterations above 1 to train further" in out and f"`mamlkit rl eval {run} --overwrite`" in out
    assert "| 0 |" not in out  # no report again
    assert {name: (run / name).stat().st_mtime_ns for name in made} == made
    # the report missing: written, nothing trained
    (run / "eval.md").unlink()
    assert main(["rl", "train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is finished" not in out and "| 1 |" in out and (run / "eval.md").exists()
    assert checkpoint.load(run)[1]["step"] == 1 and (run / "checkpoint.safetensors").stat().st_mtime_ns == \
        made["checkpoint.safetensors"]
    # other report settings: reported again with them
    assert main(["rl", "train", "--resume", str(run), "--eval-tasks", "2"]) == 0
    assert "is finished" not in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["num_tasks"] == 2


def test_cli_eval_steps_and_adapt_to_a_goal(tmp_path, capsys):
    flags = ["--out-dir", str(tmp_path), "--run-name", "r", "--no-baselines"] + TINY_FLAGS
    assert main(["rl", "train", "nav2d", "--iterations", "1"] + flags) == 0
    run = tmp_path / "r"
    capsys.readouterr()
    assert main(["rl", "eval", str(run), "--steps", "1", "2", "3", "--no-baselines", "--overwrite"]) == 0
    out = capsys.readouterr().out
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval_lrs"] == [0.1, 0.05, 0.05] and list(ev["returns"]["maml-trpo"]) == ["0", "1", "2", "3"]
    assert "| 3 |" in out and "-3.23" in out and "rates [0.1, 0.05, 0.05]" in out
    # 5 steps: the rate after the first stays halved; only the rows asked for are listed
    assert main(["rl", "eval", str(run), "--steps", "5", "2", "--no-baselines", "--overwrite"]) == 0
    out = capsys.readouterr().out
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval_lrs"] == [0.1, 0.05, 0.05, 0.05, 0.05] and list(ev["returns"]["maml-trpo"]) == ["0", "2", "5"]
    assert "| 5 |" in out and "| 3 |" not in out and "| 1 |" not in out
    assert main(["rl", "eval", str(run), "--steps", "0"]) == 2
    assert "--steps takes step counts from 1" in capsys.readouterr().err
    # other rates (the paper's code tested nav2d with 0.5, then 0.25), the last repeated
    assert main(["rl", "eval", str(run), "--eval-lrs", "0.5", "0.25", "--steps", "1", "3", "--no-baselines",
                 "--overwrite"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval_lrs"] == [0.5, 0.25, 0.25] and "rates [0.5, 0.25, 0.25]" in capsys.readouterr().out
    assert main(["rl", "eval", str(run), "--eval-lrs", "0.5", "0.25", "--no-baselines", "--overwrite"]) == 0
    assert list(json.loads((run / "eval.json").read_text())["returns"]["maml-trpo"]) == ["0", "1", "2"]
    for bad in (["-0.1"], ["nan"], ["0.1"] * 11):
        assert main(["rl", "eval", str(run), "--eval-lrs", *bad, "--overwrite"]) == 2
        assert "--eval-lrs takes 1 to 10 finite rates >= 0" in capsys.readouterr().err

    fig = tmp_path / "adapt.png"
    assert main(["rl", "adapt", str(run), "--goal", "0.3", "-0.2", "--steps", "2", "--traj", "3",
                 "--out", str(fig)]) == 0
    out = capsys.readouterr().out
    assert fig.stat().st_size > 1000 and "goal (0.3, -0.2)" in out and "2 steps:" in out
    assert "rates 0.1, 0.05" in out


def test_rl_eval_never_replaces_a_report_silently(tmp_path, capsys):
    """The run's report (written at the end of training) stays unless --overwrite; --out writes elsewhere."""
    flags = ["--out-dir", str(tmp_path), "--run-name", "r", "--no-baselines"] + TINY_FLAGS
    assert main(["rl", "train", "nav2d", "--iterations", "1"] + flags) == 0
    run = tmp_path / "r"
    before = {n: (run / n).read_bytes() for n in ("eval.md", "eval.json")}
    capsys.readouterr()
    assert main(["rl", "eval", str(run), "--last", "--eval-tasks", "5", "--no-baselines"]) == 2
    err = capsys.readouterr().err
    assert f"{run} already holds eval.md, eval.json" in err and "--overwrite" in err and "--out DIR" in err
    assert {n: (run / n).read_bytes() for n in before} == before
    assert main(["rl", "eval", str(run / "checkpoint.safetensors"), "--eval-tasks", "5"]) == 2  # its folder's
    other = tmp_path / "elsewhere" / "last"
    assert main(["rl", "eval", str(run), "--last", "--eval-tasks", "5", "--no-baselines", "--out", str(other)]) == 0
    assert json.loads((other / "eval.json").read_text())["num_tasks"] == 5
    assert (other / "figure4_trajectories.png").exists() and (other / "returns_vs_steps.png").exists()
    assert {n: (run / n).read_bytes() for n in before} == before
    assert main(["rl", "eval", str(run), "--eval-tasks", "5", "--no-baselines", "--overwrite"]) == 0
    assert json.loads((run / "eval.json").read_text())["num_tasks"] == 5


def test_shipped_nav2d_policy_is_small_valid_and_adapts(tmp_path, capsys):
    from mamlkit.rl import train
    from mamlkit.rl.adapt_inputs import shipped_policy

    path = shipped_policy("nav2d")
    assert path.stat().st_size < 100_000
    trainer = train.load_trainer(path)  # validated: names, shapes, dtypes, schema
    assert trainer.cfg.env == "nav2d" and trainer.cfg.env_action_scale == 10.0
    assert sum(p.numel() for p in trainer.policy.parameters()) == 2 * 100 + 100 + 100 * 100 + 100 + 100 * 2 + 2 + 2
    fig = tmp_path / "goal.png"
    assert main(["rl", "adapt", "nav2d", "--goal", "0.3", "-0.2", "--steps", "1", "--traj", "10",
                 "--out", str(fig)]) == 0
    out = capsys.readouterr().out
    before, after = (float(line.split(":")[1]) for line in out.splitlines() if "step" in line and ":" in line
                     and line.strip()[0].isdigit())
    assert fig.exists() and after > before + 10  # one step towards the goal helps a lot


@pytest.mark.parametrize("argv, message", [
    (["--goal", "0.7", "0"], "outside the arena"),
    (["--goal", "0", "-0.51"], "outside the arena"),
    (["--goal", "nan", "0"], "outside the arena"),
    (["--goal", "0.1", "north"], "invalid float value"),
    (["--goal", "0.1"], "expected 2 arguments"),
    (["--goal", "0.1", "0.1", "--steps", "4"], "--steps must be 1, 2 or 3"),
    (["--goal", "0.1", "0.1", "--out", "fig.txt"], "must end in .png"),
])
def test_cli_adapt_bad_goals_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) if "float" in message or "arguments" in message else _nullcontext() as e:
        rc = main(["rl", "adapt", str(tmp_path / "missing")] + argv)
    rc = e.value.code if e is not None and hasattr(e, "value") else rc
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["rl", "train", "walker"], "name an environment"),
    (["rl", "train", "nav2d", "--max-kl", "-1"], "max_kl must be > 0"),
    (["rl", "train", "nav2d", "--algo", "ppo"], "algo must be maml-trpo or pretrain"),
    (["rl", "eval", "/nonexistent/run"], "checkpoint not found"),
])
def test_cli_bad_input_exits_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--out-dir", str(tmp_path)] if argv[1] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_resume_rejects_changing_the_run(tmp_path, capsys):
    flags = ["--out-dir", str(tmp_path), "--run-name", "r", "--no-baselines"] + TINY_FLAGS
    assert main(["rl", "train", "nav2d", "--iterations", "1"] + flags) == 0
    assert main(["rl", "train", "--resume", str(tmp_path / "r"), "--inner-lr", "0.5"]) == 2
    assert "cannot change inner_lr" in capsys.readouterr().err
    assert main(["rl", "train", "nav2d", "--iterations", "1"] + flags) == 2  # the folder holds a checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- half-cheetah (optional extra)

def test_cheetah_reward_truncation_and_determinism(tmp_path, monkeypatch):
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    from mamlkit.rl import cheetah
    from mamlkit.rl.envs import make_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cheetah, "_POOL", [])  # build simulators here: MuJoCo must not write MUJOCO_LOG.TXT

    vel = sample_tasks("cheetah-vel", 2, task_generator(0, "train", 0))
    assert vel.shape == (2, 1) and ((0 <= vel) & (vel <= 2)).all()
    dirs = sample_tasks("cheetah-dir", 40, task_generator(0, "train", 0))
    assert set(dirs.flatten().tolist()) == {-1.0, 1.0}
    env = make_env("cheetah-vel", vel, num_envs=2, horizon=4)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (2, 2, 17)
    action = torch.full((2, 2, 6), 0.5)
    for t in range(4):
        obs, r, term, trunc, info = env.step(action)
        # r = −|v − v_goal| − 0.05·‖a‖² with ‖a‖² = 6·0.25
        assert torch.allclose(r, -(info["x_velocity"] - vel).abs() - 0.05 * 1.5)
        assert trunc.all() == (t == 3) and not term.any()
    env2 = make_env("cheetah-dir", dirs[:2], num_envs=2, horizon=4)
    obs2, _ = env2.reset(seed=3)
    first, _ = make_env("cheetah-vel", vel, num_envs=2, horizon=4).reset(seed=3)
    assert torch.equal(obs2, first)   # same seed, same initial states
    _, r, _, _, info = env2.step(torch.zeros(2, 2, 6))
    assert torch.allclose(r, dirs[:2] * info["x_velocity"])
    # action_scale 10: the policy's action 5 is the torque 0.5 (same dynamics), 20 is clipped to 1,
    # and the control cost is on the torque: 0.05·(3·0.25 + 3·1) = 0.1875
    # (one after the other: environments of the same size share the pooled simulators)
    unscaled = make_env("cheetah-vel", vel, num_envs=2, horizon=4)
    unscaled.reset(seed=5)
    o1, r1, *_ = unscaled.step(torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 1.0]).expand(2, 2, 6))
    scaled = make_env("cheetah-vel", vel, num_envs=2, horizon=4, action_scale=10.0)
    scaled.reset(seed=5)
    o2, r2, _, _, info = scaled.step(torch.tensor([5.0, 5.0, 5.0, 20.0, 20.0, 20.0]).expand(2, 2, 6))
    assert torch.equal(o1, o2) and torch.allclose(r1, r2)
    assert torch.allclose(r2, -(info["x_velocity"] - vel).abs() - 0.1875)
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_cheetah_steps_are_gymnasiums_bit_for_bit(tmp_path, monkeypatch):
    # The environment steps the simulators with MuJoCo's calls, not gymnasium's step: the same states.
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    from mamlkit.rl import cheetah

    monkeypatch.chdir(tmp_path)
    ours, theirs = ([gym.make("HalfCheetah-v5").unwrapped for _ in range(3)] for _ in range(2))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.array_equal(a.reset(seed=i)[0], b.reset(seed=i)[0])
    rng = np.random.default_rng(0)
    for _ in range(25):
        actions = rng.uniform(-1, 1, (3, 6))
        obs, vel = cheetah._step_all(ours, actions)
        want = [b.step(act) for b, act in zip(theirs, actions)]
        assert np.array_equal(obs, np.stack([w[0] for w in want]))
        assert np.array_equal(vel, np.array([w[4]["x_velocity"] for w in want]))
    assert np.abs(vel).max() > 0.01  # the simulators moved


def test_cheetah_cli_smoke(tmp_path):
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    argv = ["rl", "train", "cheetah-dir", "--out-dir", str(tmp_path), "--iterations", "1",
            "--meta-batch", "2", "--traj-per-task", "2", "--horizon", "5", "--hidden-sizes", "8",
            "--eval-tasks", "2", "--eval-traj", "2", "--no-baselines", "--no-progress"]
    assert main(argv) == 0
    ev = json.loads((tmp_path / "rl-cheetah-dir-maml-trpo" / "eval.json").read_text())
    assert ev["paper"] == [-50.69, 293.19, 313.48, 315.65] and len(ev["returns"]["maml-trpo"]) == 4


def test_interrupt_rolls_back_the_unfinished_iteration(tmp_path, monkeypatch):
    from mamlkit.rl import train

    trainer = train.new_trainer(RLConfig(**TINY, iterations=3, progress=False), tmp_path / "run")
    train.fit(trainer, stop_at=1)
    after_one = {k: p.detach().clone() for k, p in trainer.policy.named_parameters()}

    def interrupted(self, tasks, generator):
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1.0)  # a half-finished update...
        raise KeyboardInterrupt  # ...then Ctrl-C

    monkeypatch.setattr(MAMLTRPO, "meta_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.fit(trainer)
    saved, state = checkpoint.load(tmp_path / "run")
    assert state["step"] == 1
    assert all(torch.equal(saved[f"meta/{k}"], v) for k, v in after_one.items())


def _wait_for(cond, proc, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_signal_inside_the_policy_finishes_the_iteration_first(tmp_path):
    # A signal raised inside torch's vmap or functional_call (here: in the policy's forward while step 2
    # samples) could leave the process's torch state broken; it must take effect after the iteration.
    from mamlkit import runfolder
    from mamlkit.rl import train

    trainer = train.new_trainer(RLConfig(**TINY, iterations=50, checkpoint_every=100, val_every=0,
                                         progress=False), tmp_path / "r")
    forward = trainer.policy.forward

    def signalled(*args, **kwargs):
        if trainer.step == 2:
            trainer.policy.forward = forward
            signal.raise_signal(signal.SIGINT)
        return forward(*args, **kwargs)

    trainer.policy.forward = signalled
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with runfolder.stop_on_signals(), pytest.raises(runfolder.Stopped):
            train.fit(trainer)
    finally:  # stop_on_signals leaves them ignored once one has arrived; this process goes on
        for s, h in handlers.items():
            signal.signal(s, h)
    assert trainer.step == 3 and train.load_trainer(tmp_path / "r").step == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_sigint_checkpoints_exits_130_and_resumes_exactly(tmp_path):
    """Ctrl-C (SIGINT) stops `mamlkit rl train` promptly with a resumable checkpoint, even in a process
    that inherited SIGINT ignored (a background job of a script), where Python raises nothing by default."""
    from mamlkit.rl import train

    run = tmp_path / "r"
    argv = [sys.executable, "-m", "mamlkit", "rl", "train", "nav2d", "--out-dir", str(tmp_path), "--run-name",
            "r", "--iterations", "1000000", "--checkpoint-every", "1", "--val-every", "0", "--no-baselines",
            *TINY_FLAGS]
    # `trap '' INT` + exec: the child starts with SIGINT ignored, as a background job of a script does
    proc = subprocess.Popen(["sh", "-c", "trap '' INT; exec " + shlex.join(argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"mamlkit rl train --resume {run}" in err and "Traceback" not in err
    _, state = checkpoint.load(run)
    step = state["step"]
    assert step >= 3
    # resuming for 2 more iterations == an uninterrupted run of step + 2 iterations, bit for bit
    resumed = train.load_trainer(run)
    resumed.cfg = resumed.cfg.replace(iterations=step + 2)
    train.fit(resumed)
    ref = train.fit(train.new_trainer(resumed.cfg, tmp_path / "ref"))
    assert resumed.step == ref.step == step + 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.policy.parameters(), ref.policy.parameters()))


def test_validation_keeps_the_best_policy_and_eval_uses_it(tmp_path, capsys):
    from mamlkit.rl import train

    run = tmp_path / "v"
    flags = ["--out-dir", str(tmp_path), "--run-name", "v", "--no-baselines", "--val-every", "1",
             "--val-tasks", "3", *TINY_FLAGS]
    assert main(["rl", "train", "nav2d", "--iterations", "3", *flags]) == 0
    assert main(["rl", "train", "--resume", str(run), "--iterations", "5", "--no-baselines"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in vals] == [1, 2, 3, 4, 5]
    best = max(vals, key=lambda r: r["return_post"])
    assert vals[-1]["best_return_post"] == best["return_post"]
    _, state = checkpoint.load(run / "best.safetensors")
    assert state["step"] == best["step"] and state["val_return_post"] == pytest.approx(best["return_post"])
    assert checkpoint.load(run)[1]["best_val"] == pytest.approx(best["return_post"])  # survives resume
    # best.safetensors holds that iteration's policy: validating it again gives the logged returns
    again = train.validate(train.load_trainer(run / "best.safetensors"))
    assert again["return_pre"] == pytest.approx(best["return_pre"], abs=1e-9)
    assert again["return_post"] == pytest.approx(best["return_post"], abs=1e-9)
    capsys.readouterr()
    assert main(["rl", "eval", str(run), "--no-baselines", "--overwrite"]) == 0
    assert f"iteration {best['step']} of 5, the best validation" in capsys.readouterr().out
    assert main(["rl", "eval", str(run), "--last", "--no-baselines", "--overwrite"]) == 0
    assert "policy of iteration 5" in capsys.readouterr().out


def test_checkpoints_from_before_action_scale_load_unscaled(tmp_path):
    from mamlkit.rl import train

    trainer = train.new_trainer(RLConfig(**TINY, iterations=1, progress=False), tmp_path)
    tensors = {f"meta/{k}": v for k, v in trainer.policy.named_parameters()}
    cfg = trainer.cfg.to_dict()
    del cfg["action_scale"], cfg["val_every"], cfg["val_tasks"]
    checkpoint.save(tmp_path / "old.safetensors", tensors, {"kind": "rl", "config": cfg, "step": 7})
    old = train.load_trainer(tmp_path / "old.safetensors")
    assert old.cfg.action_scale == 1.0 and old.step == 7 and old.best_val is None


# Recorded from the code before `rl train` and `rl eval` went through the recipe (loop/run.py) and the step
# guards: the shipped policy's returns and a fixed-seed float64 run, bit for bit.
SHIPPED_CURVE = [[-7.073286533355713, -7.933540344238281, -5.337200164794922, -3.2204763889312744],
                 [-12.52863597869873, -3.4922568798065186, -5.158813953399658, -2.9308054447174072],
                 [-6.893007755279541, -7.201966285705566, -1.7406251430511475, -6.10557746887207]]
RUN_RETURNS = {"maml-trpo": [-4.694557738285864, -3.7862658469863244, -4.470623858388716, -3.7885222978568938],
               "pretrained": [-4.644198754080218, -3.827278231200129, -4.4431373785357176, -3.8673011956301075],
               "random init": [-5.015267579873855, -4.25966444575638, -4.695640706803315, -4.039793028433159]}
RUN_ROWS = {(1, "val"): (-4.570375098248293, -3.988910599505868),
            (1, "train"): (-4.803602614901753, -4.743631450996122),
            (2, "val"): (-4.487745845262209, -3.765522826290283), (2, "train"): (-2.9776239157831, -1.9633932961377425)}
RUN_TRAIN = {1: (0.3125559802521858, -0.029689764692593157, 0.007771776315336306),
             2: (0.33378780370214267, -0.03324496433445318, 0.0063949095505326245)}
RUN_PARAM_SUMS = {"meta/log_std": 0.002373731529316865, "meta/mean.0.bias": -0.9878940164096937,
                  "meta/mean.0.weight": -2.651304221667681, "meta/mean.2.bias": 0.49325414403703594,
                  "meta/mean.2.weight": -0.3634097727982383}


def test_shipped_policy_and_a_fixed_seed_run_give_the_recorded_numbers(tmp_path, capsys):
    from mamlkit.rl import evaluate, train
    from mamlkit.rl.adapt_inputs import shipped_policy

    shipped = train.load_trainer(shipped_policy("nav2d"))
    cfg = shipped.cfg.replace(eval_tasks=3, eval_traj=2, horizon=20)
    assert evaluate.adaptation_curve(shipped.policy, cfg, evaluate.test_tasks(cfg)).double().tolist() == SHIPPED_CURVE

    flags = [*TINY_FLAGS, "--dtype", "float64", "--seed", "3", "--val-every", "1"]
    assert main(["rl", "train", "nav2d", "--iterations", "2", "--out-dir", str(tmp_path), "--run-name", "r",
                 *flags]) == 0
    run = tmp_path / "r"
    ev = json.loads((run / "eval.json").read_text())
    assert {n: [c[s]["mean"] for s in sorted(c)] for n, c in ev["returns"].items()} == RUN_RETURNS
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["step"], r["split"]): (r["return_pre"], r["return_post"]) for r in rows} == RUN_ROWS
    assert {r["step"]: (r["grad_norm"], r["loss"], r["kl"]) for r in rows if r["split"] == "train"} == RUN_TRAIN
    tensors, _ = checkpoint.load(run)
    assert {k: v.double().sum().item() for k, v in sorted(tensors.items())} == RUN_PARAM_SUMS


def test_rl_train_overwrite_replaces_the_run_and_an_empty_folder_is_no_run_to_resume(tmp_path, capsys):
    flags = ["--out-dir", str(tmp_path), "--run-name", "r", "--no-baselines", *TINY_FLAGS]
    assert main(["rl", "train", "nav2d", "--iterations", "1", *flags]) == 0
    run = tmp_path / "r"
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["rl", "train", "nav2d", "--iterations", "2", "--overwrite", *flags]) == 0
    assert checkpoint.load(run)[1]["step"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]  # a fresh log, not the old one's rows
    assert (run / "notes.txt").read_text() == "mine"  # what the run did not write stays
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"run folder: {run} (checkpoint.safetensors, ") and "eval.md" in last, last

    assert main(["rl", "train", "--resume", str(run), "--overwrite"]) == 2
    assert "cannot be combined with --resume" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["rl", "train", "--resume", str(empty)]) == 2
    assert f"{empty} holds no checkpoint" in capsys.readouterr().err
