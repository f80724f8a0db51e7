"""Meta-World's official evaluation of a mamlkit policy: ``metaworld.evaluation.metalearning_evaluation`` on
the benchmark's test split, with the Gaussian MLP policy and MAML's inner step as its ``MetaLearningAgent``.

For k in 0 and each requested step count, the package's function runs ``rounds`` rounds; in each, every
sub-environment of its test vector environment takes its next test goal, the agent samples
``adapt_episodes`` episodes per goal and takes one policy-gradient step per adaptation step (rates
``cfg.eval_lrs``: 0.1, then 0.05), and the package scores ``eval_episodes`` episodes of the mean action
with termination on success. The package returns its own mean success rate and return; a recorder around
its vector environment keeps each goal's evaluation episodes (completing those the package did not wait for,
:class:`Recorder`), so the report also gives the mean ± 95% CI over the test goals.
"""

from __future__ import annotations

import gc
import json
import math
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mamlkit.base.batch import task_generator
from mamlkit.base.errors import UserError
from mamlkit.base.metrics import mean_ci
from mamlkit.checkpoint import atomic_write_text
from mamlkit.engine.functional import named_params
from mamlkit.rl import metaworld_published, sampling
from mamlkit.rl.config import RLConfig
from mamlkit.rl.maml_trpo import adapt_tasks
from mamlkit.rl.metaworld import GOALS_PER_TYPE, _package, benchmark, record
from mamlkit.rl.policy import split_dist


class PolicyAgent:
    """Meta-World's ``MetaLearningAgent`` protocol (``init``, ``adapt_action``, ``step``, ``adapt``, and the
    ``Agent``'s ``eval_action``, ``reset``) over a :class:`~mamlkit.rl.policy.GaussianMLPPolicy`.

    ``adapt_action`` samples a ~ N(μ, σ²) with noise from ``generator`` and hands the environment
    clip(a / ``cfg.env_action_scale``, ±1), as training does; ``adapt`` packs the episodes it was shown
    (advantages over the linear baseline, as training) and takes one inner step per sub-environment, its
    ``k``-th at rate ``lrs[k]`` (the last rate repeats); ``eval_action`` is the mean action."""

    def __init__(self, model: nn.Module, cfg: RLConfig, lrs: tuple[float, ...], generator: torch.Generator):
        self.model, self.cfg, self.lrs, self.generator = model, cfg, lrs, generator
        self.theta = {k: v.detach() for k, v in named_params(model).items()}
        self.dtype = next(iter(self.theta.values())).dtype
        self.init()

    def init(self) -> None:
        """Back to the meta-learned parameters, before a new round of goals."""
        self.params, self.per_task, self.adapted, self.buffer = self.theta, False, 0, []

    def _out(self, obs: np.ndarray) -> Tensor:
        o = torch.as_tensor(np.asarray(obs), dtype=self.dtype)[:, None, :]  # [E, 1, d]: one step per task
        return sampling.policy_fn(self.model, self.params, self.per_task)(o)[:, 0]

    def _to_env(self, action: Tensor) -> np.ndarray:
        return (action.double() / self.cfg.env_action_scale).clamp(-1, 1).numpy()

    @torch.no_grad()
    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``observations [E, 39]`` -> the environment's actions ``[E, 4]`` and, for :meth:`step`, the policy's
        own (unscaled) actions and distributions."""
        out = self._out(observations)
        mean, log_std = split_dist(out)
        noise = torch.randn(mean.shape, generator=self.generator, dtype=torch.float64).to(self.dtype)
        action = mean + torch.exp(log_std) * noise
        return self._to_env(action), {"policy_action": action.numpy(), "dist": out.numpy()}

    @torch.no_grad()
    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        """``observations [E, 39]`` -> the mean action of each sub-environment's policy, as the environment's."""
        return self._to_env(split_dist(self._out(observations))[0])

    def reset(self, env_mask: np.ndarray) -> None:
        """Nothing to reset: the policy is feed-forward."""

    def step(self, timestep: Any) -> None:
        """Keep one step of every sub-environment (a ``metaworld.evaluation.Timestep``) for :meth:`adapt`."""
        aux = timestep.aux_policy_outputs
        self.buffer.append((timestep.observation, aux["policy_action"], aux["dist"], timestep.reward,
                            np.logical_or(timestep.terminated, timestep.truncated)))

    def adapt(self) -> None:
        """One policy-gradient step per sub-environment on the episodes shown since the last one."""
        obs, act, dist, rew, done = (np.stack(col, axis=1) for col in zip(*self.buffer))  # [E, S, ...]
        horizon = int(np.argmax(done[0])) + 1
        E, S = done.shape
        if S % horizon or not done[:, horizon - 1::horizon].all():
            raise RuntimeError("the adaptation episodes of Meta-World's evaluation are not all of one length; "
                               "they end only by the time limit while the agent adapts")
        shape = (E, S // horizon, horizon)
        cols = [torch.as_tensor(x, dtype=self.dtype).reshape(*shape, -1) for x in (obs, act, dist)]
        rewards = torch.as_tensor(rew, dtype=self.dtype).reshape(shape)
        ep = sampling.Episodes(cols[0], cols[1], rewards, torch.ones_like(rewards), cols[2])
        sx, sy = sampling.pack(ep, self.cfg.gamma, self.cfg.gae_lambda, with_dist=False)
        lr = self.lrs[min(self.adapted, len(self.lrs) - 1)]
        self.params = adapt_tasks(self.model, self.params, sx, sy, lr, self.per_task)
        self.per_task, self.adapted, self.buffer = True, self.adapted + 1, []


class Recorder:
    """Meta-World's test vector environment, watched: every episode that ends while the package evaluates
    (termination on success switched on) is kept per (round, sub-environment), i.e. per test goal.

    The package stops evaluating once each task type has ``evaluation_episodes`` episodes over all its
    sub-environments, first ended first: with several goals per type (ML1), the goals whose episodes succeed
    early are scored and the others may have no episode at all. So when the package ends its evaluation, the
    recorder steps on with ``agent``'s evaluation actions until every goal has ``episodes`` episodes; the
    package's own numbers are computed before and are unchanged, and each round starts with fresh goals and
    a reset."""

    def __init__(self, envs: Any, agent: PolicyAgent, episodes: int):
        self.envs, self.agent, self.wanted = envs, agent, episodes
        self.round, self.evaluating, self.obs = -1, False, None
        self.episodes: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self.goals: list[list[tuple[float, ...]]] = []  # per round, each sub-environment's goal (its rand_vec)

    @property
    def num_envs(self) -> int:
        """The sub-environments (goals evaluated at once)."""
        return self.envs.num_envs

    def get_attr(self, name: str) -> Any:
        """The vector environment's ``get_attr``."""
        return self.envs.get_attr(name)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The vector environment's ``call``, noting new goals (``sample_tasks``) and the evaluation phase."""
        if name == "toggle_terminate_on_success":
            if self.evaluating and not args[0]:  # the package's evaluation has ended: score every goal
                self._complete()
            self.evaluating = bool(args[0])
        out = self.envs.call(name, *args, **kwargs)
        if name == "sample_tasks":
            self.round += 1
            self.goals.append([goal_key(v) for v in self.envs.get_attr("_last_rand_vec")])
        return out

    def reset(self, **kwargs: Any) -> Any:
        """The vector environment's ``reset``."""
        out = self.envs.reset(**kwargs)
        self.obs = out[0]
        return out

    def _complete(self) -> None:
        """Step with the agent's evaluation actions until every goal of the round has its episodes."""
        def short() -> bool:
            return any(len(self.episodes.get((self.round, i), ())) < self.wanted for i in range(self.num_envs))

        while short():
            self.step(self.agent.eval_action(self.obs))

    def step(self, actions: np.ndarray) -> Any:
        """The vector environment's ``step``, keeping each evaluation episode's success and return as it ends."""
        out = self.envs.step(actions)
        self.obs, _, terminated, truncated, infos = out
        if self.evaluating:
            for i in np.flatnonzero(np.logical_or(terminated, truncated)):
                final = infos["final_info"]
                self.episodes.setdefault((self.round, int(i)), []).append(
                    (float(final["success"][i]), float(final["episode"]["r"][i])))
        return out


def goal_key(rand_vec: Any) -> tuple[float, ...]:
    """A Meta-World goal (a task's ``rand_vec``: object and goal positions) as a hashable key."""
    return tuple(np.round(np.asarray(rand_vec, dtype=np.float64), 9).tolist())


def indices_in_test_split(env: str, seed: int, goals: list[list[tuple[float, ...]]]) -> list[int]:
    """The index in the benchmark's test split of every goal of ``goals`` (per round, per sub-environment);
    raises if one is not a test goal."""
    index = {goal_key(pickle.loads(t.data)["rand_vec"]): i for i, t in enumerate(benchmark(env, seed).test_tasks)}
    found = [index.get(g) for row in goals for g in row]
    if None in found:
        raise RuntimeError("Meta-World's test environment evaluated a goal outside the benchmark's test split")
    return found


def release(envs: Recorder) -> None:
    """Close a test vector environment and free it now. Its 50 simulators each hold their own compiled model (about
    21 MB: the package builds them, so they cannot share one as training's do), and the environments keep
    reference cycles that Python's collector, counting objects rather than bytes, may leave for several step
    counts: without this an evaluation of 50 goals held three or four of them at once."""
    envs.envs.close()
    envs.envs = None
    gc.collect()


def layout(env: str, seed: int, goals: int) -> tuple[int, int]:
    """``(sub-environments, rounds)`` for at least ``goals`` test goals: the package's test vector environment
    takes a multiple of the test task types whose share divides each type's 50 goals."""
    types = len(benchmark(env, seed).test_classes)
    if goals > GOALS_PER_TYPE * types:
        raise UserError(f"--eval-tasks {goals} asks for more test goals than {env}'s test split holds "
                        f"({GOALS_PER_TYPE * types}: {GOALS_PER_TYPE} per task type); use at most that many")
    per_type = max([d for d in range(1, GOALS_PER_TYPE + 1) if GOALS_PER_TYPE % d == 0 and d * types <= goals]
                   or [1])
    return per_type * types, max(1, math.ceil(goals / (per_type * types)))


def official_evaluation(model: nn.Module, cfg: RLConfig, steps: tuple[int, ...], eval_episodes: int = 3
                        ) -> dict[str, Any]:
    """Meta-World's ``metalearning_evaluation`` after 0 and each of ``steps`` adaptation steps, on the test
    split of the benchmark of ``cfg.seed``: ``cfg.eval_tasks`` goals at least (:func:`layout`),
    ``cfg.test_traj`` adaptation episodes per goal and step, ``eval_episodes`` scored episodes.

    Returns, per step count, the package's own mean success rate and return, the mean ± 95% CI of both
    over the test goals, and each goal's (in the order of ``test_goals``, their indices in the test split, so
    that two policies' evaluations pair goal by goal). Every step count runs on the same goals (a fresh vector
    environment of the same seed) with the same sampling noise."""
    mw = _package()
    from metaworld.evaluation import metalearning_evaluation

    sub_envs, rounds = layout(cfg.env, cfg.seed, cfg.eval_tasks)
    name = "ML10" if cfg.env == "ml10" else f"{cfg.env.removeprefix('ml1-')}-v3"
    results: dict[str, Any] = {}
    for k in (0, *steps):
        agent = PolicyAgent(model, cfg, cfg.eval_lrs, task_generator(cfg.seed, "test", 0, "metaworld"))
        envs = Recorder(mw.make_ml_envs_test(name, seed=cfg.seed, meta_batch_size=sub_envs,
                                             max_episode_steps=cfg.episode_len,
                                             reward_function_version=cfg.reward_version), agent, eval_episodes)
        try:
            success, ret, _ = metalearning_evaluation(agent, envs, num_evals=rounds, adaptation_steps=k,
                                                      adaptation_episodes=cfg.test_traj,
                                                      evaluation_episodes=eval_episodes)
        finally:
            release(envs)
        per_goal = torch.tensor([[np.mean([e[j] for e in envs.episodes[g][:eval_episodes]]) for j in (0, 1)]
                                 for g in sorted(envs.episodes)], dtype=torch.float64)  # goals by (round, env)
        (sm, sci), (rm, rci) = mean_ci(per_goal[:, 0]), mean_ci(per_goal[:, 1])
        results[str(k)] = {"official_success_rate": success, "official_return": ret, "goals": per_goal.shape[0],
                           "success_rate": {"mean": sm, "ci95": sci}, "return": {"mean": rm, "ci95": rci},
                           "goal_successes": per_goal[:, 0].tolist(), "goal_returns": per_goal[:, 1].tolist(),
                           "test_goals": indices_in_test_split(cfg.env, cfg.seed, envs.goals)}
    return {"sub_envs": sub_envs, "rounds": rounds, "adaptation_episodes": cfg.test_traj,
            "evaluation_episodes": eval_episodes, "steps": results}


def report(out_dir: Path, model: nn.Module, cfg: RLConfig, steps: tuple[int, ...], eval_episodes: int = 3) -> str:
    """Run :func:`official_evaluation` and write ``eval.md`` and ``eval.json`` (with the package's version, the
    reward version and the benchmark's seed, which fixes the test goals) into ``out_dir``; return the table,
    followed by the published MAML figures for the benchmark (:mod:`mamlkit.rl.metaworld_published`) where
    there are any."""
    result = official_evaluation(model, cfg, steps, eval_episodes)
    env = record(cfg.env, cfg.reward_version)
    lines = [f"{cfg.env}: Meta-World {env['version']} ({env['benchmark']}"
             + (f" {env['task']}" if env["task"] else "") + f", reward {env['reward_version']}), test split, "
             "metaworld.evaluation.metalearning_evaluation: success rate and return after k adaptation steps (rates "
             f"{list(cfg.eval_lrs)}, {result['adaptation_episodes']} episode(s) per goal and step), mean ± 95% CI over "
             f"the test goals ({result['rounds']} round(s) of {result['sub_envs']}), "
             f"{result['evaluation_episodes']} evaluation episode(s) each; 'official' is the package's own mean "
             "(per task type, its first episodes to end over all goals).",
             "", "| steps | success rate | return | official success rate | official return |",
             "|---|---|---|---|---|"]
    for k, r in result["steps"].items():
        s, g = r["success_rate"], r["return"]
        lines.append(f"| {k} | {s['mean']:.3f} ± {s['ci95']:.3f} | {g['mean']:.2f} ± {g['ci95']:.2f} | "
                     f"{r['official_success_rate']:.3f} | {r['official_return']:.2f} |")
    published = metaworld_published.table(cfg.env, cfg.reward_version)
    text = "\n".join(lines + ([""] + published if published else [])) + "\n"
    atomic_write_text(out_dir / "eval.json", json.dumps({
        "env": cfg.env, "environment": env, "seed": cfg.seed, "eval_lrs": list(cfg.eval_lrs), **result,
        "published": [asdict(f) for f in metaworld_published.figures(cfg.env)]}, indent=2))
    atomic_write_text(out_dir / "eval.md", text)
    return text
