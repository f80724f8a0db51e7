"""MAML-TRPO (Finn et al. 2017, §5.3): REINFORCE inner step, TRPO outer step, on the mamlkit strategies.

The inner step is the engine's :func:`~mamlkit.engine.inner.adapt_path` with the SGD rule on the
policy-gradient loss ``loss_fn(model(states), (actions, advantages, mask))``; the outer
objective and KL come out of :func:`~mamlkit.engine.inner.make_task_fn` run by the
:class:`~mamlkit.exec.executor.Executor` (vmap unless the caller hands another, as every learner's per-task
work; the inner step and the post-update policies' sampling run on it too), so the meta-gradient and the
Fisher-vector products differentiate through the inner step exactly (or first-order with ``first_order``).
TRPO takes the gradient and the Fisher products task by task from :func:`linearize_tasks` (the
same numbers as autograd on that objective, in fewer passes; ``fast_fisher=False`` uses autograd).
With ``inner_steps=0`` the same code is TRPO on all tasks jointly (the pretrained baseline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mamlkit.base.batch import TaskBatch
from mamlkit.engine.functional import call, named_params
from mamlkit.engine.inner import LossFn, adapt_path, make_task_fn, support_loss_fn
from mamlkit.engine.rules import sgd
from mamlkit.exec.executor import Executor
from mamlkit.loop.distributed import World
from mamlkit.rl import sampling
from mamlkit.rl.config import RLConfig
from mamlkit.rl.envs import action_limit, check_train_tasks, make_env
from mamlkit.rl.policy import kl_divergence, log_prob
from mamlkit.rl.trpo import Linearization, flat, trpo_step

Params = dict[str, Tensor]


ESTIMATORS = ("reinforce", "lvc", "dice")


def magic_box(x: Tensor) -> Tensor:
    """DiCE's operator (Foerster et al. 2018): value 1, derivative ``magic_box(x) · ∇x``."""
    return torch.exp(x - x.detach())


def pg_loss(act_dim: int, estimator: str = "reinforce", horizon: int = 0):
    """The inner policy-gradient loss ``loss(pred [M, 2a], y [M, a+2]) -> scalar``, M = N·H steps.

    All three estimators have the same gradient, −Σ mask·A·∇log π(a|s) / Σ mask, so the inner step
    (and the post-update sampling policy) is the same; they differ in the second derivative, which
    the meta-gradient uses through the Jacobian of the inner step:

    * ``reinforce``: −Σ A·log π. Its Hessian E[A ∇²log π] leaves out E[A ∇log π ∇log πᵀ], the
      dependence of the inner step's *sampling distribution* on θ (Finn et al. 2017, as in their code).
    * ``lvc``: −Σ A·π/⊥π, ProMP's low-variance curvature (Rothfuss et al. 2019, eq. 7): per-step
      Hessian A (∇²log π + ∇log π ∇log πᵀ); it leaves out the cross terms between time steps.
    * ``dice``: −Σ_t □(Σ_{t'≤t} log π_t')·(A_t − A_{t+1}) with □ the magic box (DiCE, Foerster et al.
      2018, with the advantages as the baseline-corrected rewards, the λ = 1 case of Loaded DiCE,
      Farquhar et al. 2019). Since Σ_{t≥t'} (A_t − A_{t+1}) = A_t', its gradient is REINFORCE's; its
      Hessian adds the cross terms ∇log π_t' ∇log π_t''ᵀ A_max(t', t''). Needs ``horizon`` H.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator == "dice" and horizon < 1:
        raise ValueError("the dice estimator needs the episode length (horizon >= 1)")

    def loss(pred: Tensor, y: Tensor) -> Tensor:
        actions, adv, mask = y[..., :act_dim], y[..., act_dim], y[..., act_dim + 1]
        logp = log_prob(pred, actions) * mask
        if estimator == "reinforce":
            weighted = logp * adv
        elif estimator == "lvc":
            weighted = magic_box(logp) * adv
        else:  # episodes are the consecutive runs of H steps of the packed [N·H] axis
            shape = (*logp.shape[:-1], -1, horizon)
            a = (adv * mask).reshape(shape)
            diff = a - torch.cat([a[..., 1:], torch.zeros_like(a[..., :1])], dim=-1)
            weighted = magic_box(logp.reshape(shape).cumsum(-1)) * diff
        return -weighted.sum() / mask.sum().clamp_min(1)

    return loss


def surrogate_and_kl(new: Tensor, qy: Tensor, act_dim: int) -> tuple[Tensor, Tensor]:
    """One task's ``(surrogate loss, mean KL(π_old ‖ π_new))`` from the policy's outputs ``new [M, 2a]`` on
    its query states and ``qy [M, a + 2 + 2a]`` (actions, advantages, mask, the sampling policy's mean and
    log σ): −E[π_new(a|s)/π_old(a|s) · A] and the KL, both averaged over the valid steps."""
    actions, adv, mask = qy[..., :act_dim], qy[..., act_dim], qy[..., act_dim + 1]
    old = qy[..., act_dim + 2:]
    n = mask.sum().clamp_min(1)
    ratio = torch.exp(log_prob(new, actions) - log_prob(old, actions))
    return -(ratio * adv * mask).sum() / n, (kl_divergence(old, new) * mask).sum() / n


def trpo_objective(act_dim: int):
    """The outer objective of one task: :func:`surrogate_and_kl` of π_θ' on the query episodes, θ' = θ_K
    the adapted parameters."""

    def objective(path, loss, sx, sy, qx, qy, predict, loss_fn):
        return surrogate_and_kl(predict(path[-1], qx), qy, act_dim)

    return objective


def adapt_tasks(model: nn.Module, params: Mapping[str, Tensor], sx: Tensor, sy: Tensor, lr: float,
                per_task: bool, executor: Executor | None = None) -> Params:
    """One policy-gradient step per task with the engine's inner loop: returns detached ``θ'`` with
    a leading task dim. ``params``: shared (``per_task=False``) or ``[T, ...]`` per task;
    ``sx [T, M, d]``, ``sy [T, M, a+2]`` from :func:`mamlkit.rl.sampling.pack`. The tasks run on
    ``executor`` (default: :func:`mamlkit.rl.sampling.task_executor`)."""
    act_dim = sy.shape[-1] - 2
    loss = support_loss_fn(model, pg_loss(act_dim), {}, {})

    def one(p: Params, x: Tensor, y: Tensor) -> Params:
        fast = adapt_path(loss, p, x, y, rule=sgd(lr), steps=1, first_order=True)[-1]
        return {k: v.detach() for k, v in fast.items()}

    params = {k: v.detach() for k, v in params.items()}
    run = executor or sampling.task_executor(model)
    return run.map(one, params, sx, sy) if per_task else run.map(one, sx, sy, shared=(params,))


def linearize_tasks(model: nn.Module, batch: TaskBatch, fisher: TaskBatch | None, *, loss_fn: LossFn, lr: float,
                    steps: int, first_order: bool, act_dim: int, counts: tuple[int, int] | None = None,
                    gather: Gather | None = None) -> Linearization:
    """MAML-TRPO's loss, meta-gradient and Fisher products at θ_old (the model's parameters), task by task.

    Task t adapts θ'_t = θ − α∇L_t(θ) (one SGD step on its support loss ``loss_fn``; θ itself when ``steps``
    is 0), and f_t(θ'_t) are the policy's outputs on its query states. With J_t = dθ'_t/dθ = I − α∇²L_t
    (I with ``first_order`` or no step):

    * loss (1/T) Σ S_t, the surrogate of :func:`surrogate_and_kl`; gradient (1/T) Σ J_tᵀ ∇_θ' S_t;
    * Fisher product F v = (1/K) Σ_{t<K} J_t G_t J_t v over the K tasks of ``fisher`` (its first K support
      sets are the batch's; its query states may be a subset; None: the batch), with G_t = ∂f_tᵀ (∇²_f KL_t)
      ∂f_t the Gauss-Newton matrix of the task's KL at θ'_t.

    ``counts``: ``(T, K)`` of the whole meta-batch when ``batch`` and ``fisher`` hold one rank's block of it
    (default: their own task counts), and ``gather(rows, n)`` collects every rank's per-task rows into the
    ``n`` rows of the whole batch: the sums over tasks are then the whole batch's, added in task order as
    one process adds them, so several ranks give its numbers bit for bit.

    These are the numbers :func:`~mamlkit.rl.trpo.autograd_linearization` gives on :meth:`MAMLTRPO.losses`
    (to rounding; tests/test_rl.py compares them in float64). The Hessian of KL_t(f_t(θ'_t(θ))) at θ_old is
    J_tᵀ G_t J_t plus two chain-rule terms, Σ ∂KL/∂f · ∇²f and Σ ∂KL/∂θ' · ∇²θ', and both are multiplied
    by the KL's gradient, which is zero at θ_old: the query episodes were sampled by π_θ'(θ_old) itself.
    J_t is symmetric (I minus a Hessian; so only for one SGD step with a scalar rate), so J_t v is the
    reverse-mode product J_tᵀ v on the same graph.

    Why per task: every graph (the inner gradient's, the query outputs', the output-space KL's) is built
    once and reused by each of the conjugate-gradient products, which then cost about 16 matrix products
    the size of one layer's forward, against ~24 and more elementwise passes for the Hessian of the whole
    vmapped objective; one task's tensors stay in the CPU's cache, where the meta-batch's do not.
    """
    if steps > 1:
        raise ValueError(f"linearize_tasks needs at most one inner step (J symmetric), got {steps}")
    # a copy: the products stay those at θ_old while the line search moves the parameters in place
    theta = {k: v.detach().clone().requires_grad_() for k, v in named_params(model).items()}
    leaves = list(theta.values())
    inner = support_loss_fn(model, loss_fn, {}, {})
    T = batch.num_tasks
    K = T if fisher is None else fisher.num_tasks
    T_all, K_all = counts or (T, K)
    identity = steps == 0 or first_order

    def pullback(fast: list[Tensor], w: Sequence[Tensor]) -> Sequence[Tensor]:  # J_tᵀ w (= J_t w)
        return w if identity else torch.autograd.grad(fast, leaves, w, retain_graph=True)

    losses, grads, products = [], [], []
    for t in range(T):
        fast = list(adapt_path(inner, theta, batch.support_x[t], batch.support_y[t], rule=sgd(lr), steps=steps,
                               first_order=first_order)[-1].values())
        post = [f.detach().requires_grad_() for f in fast]
        out = call(model, dict(zip(theta, post)), {}, batch.query_x[t])
        surr, kl = surrogate_and_kl(out, batch.query_y[t], act_dim)
        in_fisher, same_states = t < K, fisher is None
        u = torch.autograd.grad(surr / T_all, post, retain_graph=in_fisher and same_states)
        grads.append(flat(pullback(fast, u)))
        losses.append(surr.detach() / T_all)
        if not in_fisher:
            continue
        if not same_states:
            out = call(model, dict(zip(theta, post)), {}, fisher.query_x[t])
            kl = surrogate_and_kl(out, fisher.query_y[t], act_dim)[1]
        products.append(_gauss_newton(fast, post, out, kl / K_all, pullback))

    shapes = [p.shape for p in leaves]
    zero = torch.zeros(sum(s.numel() for s in shapes), dtype=leaves[0].dtype)

    def fvp(v: Tensor) -> Tensor:
        vs = [x.view(s) for x, s in zip(v.split([s.numel() for s in shapes]), shapes)]
        return _in_task_order([flat(product(vs)) for product in products], zero, K_all, gather)

    return Linearization(_in_task_order(losses, zero[0], T_all, gather), _in_task_order(grads, zero, T_all, gather),
                         fvp)


Gather = Callable[[Tensor, int], Tensor]  # (this rank's rows [n_r, ...], n) -> the whole batch's rows [n, ...]


def _in_task_order(parts: list[Tensor], zero: Tensor, count: int, gather: Gather | None) -> Tensor:
    """Σ_t parts[t], added one task after the other from ``zero`` (as a running sum per task does); with
    ``gather``, over the ``count`` tasks of every rank's parts."""
    rows = torch.stack(parts) if parts else zero.new_zeros((0, *zero.shape))
    if gather is not None:
        rows = gather(rows, count)
    total = zero.clone()
    for row in rows:
        total += row
    return total


def _gauss_newton(fast: list[Tensor], post: list[Tensor], out: Tensor, kl: Tensor, pullback
                  ) -> Callable[[Sequence[Tensor]], Sequence[Tensor]]:
    """``v -> J G J v`` for one task (see :func:`linearize_tasks`), from ``fast`` (θ' with its graph to θ),
    ``post`` (θ' as leaves), the outputs ``out`` = f(post) and the task's share ``kl`` of the mean KL."""
    dkl = torch.autograd.grad(kl, out, create_graph=True)[0]  # ∇_f KL with its graph: its derivative is ∇²_f KL
    y = torch.zeros_like(out, requires_grad=True)
    vjp = torch.autograd.grad(out, post, y, create_graph=True)  # ∂fᵀ y: linear in y, its derivative is ∂f

    def product(v: Sequence[Tensor]) -> Sequence[Tensor]:
        jv = pullback(fast, v)
        df = torch.autograd.grad(vjp, y, jv, retain_graph=True)[0]
        h = torch.autograd.grad(dkl, out, df, retain_graph=True)[0]
        return pullback(fast, torch.autograd.grad(out, post, h, retain_graph=True))

    return product


class MAMLTRPO:
    """Meta-trains ``model`` (a :class:`~mamlkit.rl.policy.GaussianMLPPolicy`) with MAML-TRPO.

    ``meta_step(tasks, generator)`` samples pre-update episodes with θ, adapts per task, samples
    post-update episodes with θ', and takes one TRPO step on the post-update surrogate.

    With a ``world`` of several ranks (torchrun), each rank samples and adapts its block
    :meth:`~mamlkit.loop.distributed.World.shard` of the meta-batch's tasks, drawing the numbers one process
    draws for them (:class:`~mamlkit.rl.sampling.Share`); the per-task rows of the TRPO step's loss,
    gradient, Fisher products and line-search losses come from every rank (:meth:`gather`) and are added in
    task order, so every rank takes the one-process step, bit for bit.
    """

    def __init__(self, model: nn.Module, cfg: RLConfig, world: World | None = None,
                 executor: Executor | None = None):
        self.model, self.cfg = model, cfg
        self.world = world or World()
        self.act_dim = model.log_std.numel()
        self.dtype = next(model.parameters()).dtype
        self._executor = executor

    @property
    def executor(self) -> Executor:
        """How the per-task work runs (the post-update policies' sampling, the inner step, the surrogate and KL):
        the one given, else vmap over tasks under the caller's thread count
        (:func:`~mamlkit.rl.sampling.task_executor`)."""
        if self._executor is None:
            self._executor = sampling.task_executor(self.model)
        return self._executor

    @property
    def num_tasks(self) -> int:
        """Tasks of a training meta-batch, over all ranks."""
        return self.cfg.tasks_per_batch

    def sample(self, tasks: Tensor, params: Mapping[str, Tensor], per_task: bool, generator: torch.Generator,
               num_traj: int | None = None, deterministic: bool = False, share: sampling.Share | None = None
               ) -> sampling.Episodes:
        """Episodes ``[T, N, H]`` of every task in ``tasks [T, d]`` with ``params`` (shared or per task); with
        ``share``, ``tasks`` are that block of the meta-batch."""
        env = make_env(self.cfg.env, tasks, num_traj or self.cfg.traj_per_task, self.cfg.episode_len,
                       self.cfg.env_action_scale, **self.cfg.family.settings(self.cfg))
        return sampling.rollout(env, sampling.policy_fn(self.model, params, per_task, self.executor), generator,
                                self.dtype, deterministic, share)

    def share(self, num_tasks: int) -> sampling.Share | None:
        """This rank's block of a meta-batch of ``num_tasks`` tasks; None in a single process."""
        if self.world.size == 1:
            return None
        world = self.world

        def longest(steps: int) -> int:
            return int(world.all_reduce_max(torch.tensor([steps], dtype=torch.float64)).item())

        return sampling.Share(world.shard(num_tasks), num_tasks, longest)

    def gather(self, rows: Tensor, count: int) -> Tensor:
        """This rank's rows ``[n_r, ...]`` of the first ``count`` tasks of the meta-batch -> every rank's,
        ``[count, ...]``: a sum over the ranks of buffers that are zero outside each rank's rows, so every
        value arrives exactly (x + 0 is x), and the reductions after it are one process's, bit for bit.
        (The whole rows travel, not their sum: a sum over ranks rounds differently from the task-by-task
        sum of one process, and sampling amplifies that rounding from one iteration to the next.)"""
        start = self.world.shard(self.num_tasks).start
        whole = rows.new_zeros((count, *rows.shape[1:]))
        n = max(0, min(rows.shape[0], count - start))
        whole[start:start + n] = rows[:n]
        return self.world.all_reduce_sum(whole)

    def whole(self, values: Tensor, share: sampling.Share | None) -> Tensor:
        """``values [T_r, ...]`` of this rank's tasks -> ``[T, ...]`` of the whole meta-batch (itself in a
        single process)."""
        return values if share is None else self.gather(values.to(torch.float64), share.total).to(values.dtype)

    def pack(self, ep: sampling.Episodes, with_dist: bool) -> tuple[Tensor, Tensor]:
        return sampling.pack(ep, self.cfg.gamma, self.cfg.gae_lambda, with_dist)

    def losses(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Mean surrogate loss and mean KL over tasks, with the graph to the meta-parameters."""
        cfg = self.cfg
        loss_fn = pg_loss(self.act_dim, cfg.estimator, cfg.episode_len)
        fn = make_task_fn(self.model, named_params(self.model), {}, loss_fn=loss_fn,
                          rule=sgd(cfg.inner_lr), steps=cfg.inner_steps, first_order=cfg.first_order,
                          objective=trpo_objective(self.act_dim))
        surr, kl = self.executor.evaluate_tasks(fn, batch)  # with the graph to the meta-parameters
        if self.world.size > 1:  # this rank's tasks: the whole batch's (no graph through it: the line search's)
            surr, kl = self.gather(torch.stack([surr, kl], 1).detach(), self.num_tasks).unbind(1)
        return surr.mean(), kl.mean()

    def linearize(self, batch: TaskBatch, fisher: TaskBatch | None = None) -> Linearization:
        """:func:`linearize_tasks` with this run's inner step: the loss and meta-gradient of :meth:`losses`
        on ``batch`` and the Fisher of its KL on ``fisher`` (None: ``batch``), at the current parameters.
        On several ranks, over every rank's tasks: each gets the whole meta-batch's numbers."""
        cfg = self.cfg
        several = self.world.size > 1
        counts = (self.num_tasks, self.fisher_count(self.num_tasks)) if several else None
        return linearize_tasks(self.model, batch, fisher, loss_fn=pg_loss(self.act_dim, cfg.estimator, cfg.episode_len),
                               lr=cfg.inner_lr, steps=cfg.inner_steps, first_order=cfg.first_order,
                               act_dim=self.act_dim, counts=counts, gather=self.gather if several else None)

    def fisher_count(self, num_tasks: int) -> int:
        """K, the tasks of a meta-batch of ``num_tasks`` whose KL gives the Fisher (``fisher_tasks``)."""
        return self.cfg.fisher_tasks if 0 < self.cfg.fisher_tasks < num_tasks else num_tasks

    def collect(self, tasks: Tensor, generator: torch.Generator) -> tuple[TaskBatch, dict[str, float]]:
        """Sample the support (pre-update) and query (post-update) episodes of one meta-batch.

        The stats include ``time_sample_s`` (both samplings, with advantage computation) and
        ``time_inner_s`` (the inner policy-gradient step that gives the post-update sampling policy)."""
        cfg = self.cfg
        clock = time.perf_counter()
        share = self.share(tasks.shape[0])
        if share is not None:  # this rank's block of the tasks
            if tasks.shape[0] != self.num_tasks:
                raise ValueError(f"a meta-batch on several ranks has {self.num_tasks} tasks, got {tasks.shape[0]}")
            tasks = tasks[share.rows.start:share.rows.stop]
        theta = {k: v.detach() for k, v in named_params(self.model).items()}
        pre = self.sample(tasks, theta, False, generator, share=share)
        stats = {"return_pre": self.whole(pre.returns(), share).mean().item(),
                 "clip_frac_pre": self.clip_fraction(pre, share)} | self.success_rate(pre, share, "pre")
        if cfg.inner_steps == 0:
            qx, qy = self.pack(pre, with_dist=True)
            return TaskBatch(qx, qy, qx, qy), stats | {"time_sample_s": time.perf_counter() - clock,
                                                       "time_inner_s": 0.0}
        sx, sy = self.pack(pre, with_dist=False)
        t_inner = time.perf_counter()
        fast = adapt_tasks(self.model, theta, sx, sy, cfg.inner_lr, per_task=False, executor=self.executor)
        t_inner = time.perf_counter() - t_inner
        post = self.sample(tasks, fast, True, generator, share=share)
        qx, qy = self.pack(post, with_dist=True)
        stats["return_post"] = self.whole(post.returns(), share).mean().item()
        stats |= self.success_rate(post, share, "post")
        stats |= {"time_sample_s": time.perf_counter() - clock - t_inner, "time_inner_s": t_inner}
        return TaskBatch(sx, sy, qx, qy), stats

    def success_rate(self, ep: sampling.Episodes, share: sampling.Share | None, when: str) -> dict[str, float]:
        """``{"success_<when>": fraction of the batch's episodes that succeeded}`` for environments that report
        success (Meta-World's), over every rank's episodes with ``share``; ``{}`` for the others."""
        if ep.success is None:
            return {}
        return {f"success_{when}": self.whole(ep.success.double(), share).mean().item()}

    def clip_fraction(self, ep: sampling.Episodes, share: sampling.Share | None = None) -> float:
        """Fraction of valid steps whose action the environment clipped (in any coordinate). Near 1 the
        return hardly depends on the sampled noise, so a policy-gradient step learns little. With ``share``,
        over every rank's episodes."""
        limit = action_limit(self.cfg.env) * self.cfg.env_action_scale
        actions, mask = self.whole(ep.actions, share), self.whole(ep.mask, share)
        clipped = (actions.abs() > limit).any(-1) & mask.bool()
        return (clipped.sum() / mask.sum().clamp_min(1)).item()

    def fisher_batch(self, batch: TaskBatch, generator: torch.Generator, first: int = 0) -> TaskBatch | None:
        """The part of ``batch`` whose KL gives the Fisher, or None for all of it.

        ``fisher_tasks`` keeps the first K tasks; ``fisher_fraction`` keeps that fraction of the query
        (post-update) states of every task, the same random positions for all tasks (so the tasks still
        stack under vmap; invalid steps stay masked). The support episodes are kept whole: the inner step
        must give the same θ' as in the objective, or the KL would not vanish at θ_old. Common TRPO code
        subsamples the Fisher the same way (rllab's ``subsample_factor``).

        On several ranks ``batch`` is this rank's block of the meta-batch, from task ``first`` on: it keeps
        its tasks among the first K of the whole batch (maybe none), and the same positions as every rank."""
        cfg = self.cfg
        total = batch.num_tasks if self.world.size == 1 else self.num_tasks
        sub = batch[:max(0, cfg.fisher_tasks - first)] if 0 < cfg.fisher_tasks < total else None
        if cfg.fisher_fraction < 1:
            sub = batch if sub is None else sub
            m = sub.query_x.shape[1]
            keep = torch.randperm(m, generator=generator)[:max(1, math.ceil(cfg.fisher_fraction * m))]
            sub = TaskBatch(sub.support_x, sub.support_y, sub.query_x[:, keep], sub.query_y[:, keep])
        return sub

    def meta_step(self, tasks: Tensor, generator: torch.Generator) -> dict[str, float]:
        """One meta-iteration on ``tasks [T, d]``; returns returns before/after adaptation, TRPO stats and
        the seconds spent sampling, in the inner step and in the TRPO step (``time_*_s``)."""
        cfg = self.cfg
        check_train_tasks(cfg.env, tasks)  # a benchmark's test task never trains the policy
        batch, stats = self.collect(tasks, generator)
        clock = time.perf_counter()
        share = self.share(tasks.shape[0])
        sub = self.fisher_batch(batch, generator, share.rows.start if share else 0)
        if share is not None and not cfg.fast_fisher:
            raise ValueError("--no-fast-fisher (autograd through one process's whole batch) runs on one rank only")
        if cfg.fast_fisher:
            route = {"linearize": lambda: self.linearize(batch, sub)}
        else:  # autograd's Hessian of the whole objective's KL: the reference for the route above
            route = {"fisher_kl": None if sub is None else lambda: self.losses(sub)[1]}
        stats |= trpo_step(list(self.model.parameters()), lambda: self.losses(batch), max_kl=cfg.max_kl,
                           damping=cfg.cg_damping, cg_iters=cfg.cg_iters, ls_steps=cfg.ls_steps,
                           ls_ratio=cfg.ls_ratio, **route)
        stats["time_trpo_s"] = time.perf_counter() - clock
        stats["policy_std"] = self.model.log_std.detach().exp().mean().item()  # mean σ after the step
        return stats

    def adapt_curve(self, tasks: Tensor, lrs: tuple[float, ...], generator: torch.Generator, num_traj: int,
                    params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, list[Params]]:
        """Returns ``[T, K+1]`` (mean episode return per task after 0..K steps, K = len(lrs)) and the
        per-task parameters after each step. Each step samples fresh episodes with the current θ_k,
        then takes one inner step of rate ``lrs[k]`` from θ_k (the paper's test protocol)."""
        theta = {k: v.detach() for k, v in (params or named_params(self.model)).items()}
        per_task, path, curve = False, [theta], []
        for k in range(len(lrs) + 1):
            ep = self.sample(tasks, path[-1], per_task, generator, num_traj)
            curve.append(ep.returns().mean(1))
            if k < len(lrs):
                sx, sy = self.pack(ep, with_dist=False)
                path.append(adapt_tasks(self.model, path[-1], sx, sy, lrs[k], per_task, self.executor))
                per_task = True
        return torch.stack(curve, dim=1), path
