"""Meta-RL run configuration: one frozen, keyword-only dataclass, checked on construction.

Every field is a flag of ``mamlkit rl train`` (``inner_lr`` -> ``--inner-lr``). Defaults are the
paper's 2D-navigation setting (Finn et al. 2017, §5.3 and App. A.2).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from mamlkit.base.limits import check_fields
from mamlkit.config import ConfigError, as_dict, build_config, flag, refuse_non_finite

ENV_NAMES = ("nav2d", "cheetah-vel", "cheetah-dir")
# Meta-World (the optional `metaworld` extra, mamlkit.rl.metaworld): `ml1-<task>` for any ML1 task of the
# benchmark (these are examples; the package's own list decides) and `ml10`.
METAWORLD_EXAMPLES = ("ml1-reach", "ml1-push", "ml1-pick-place", "ml10")
REWARD_VERSIONS = ("v2", "v1")  # Meta-World's reward functions; v2 is the benchmark's current one
# Meta-World's episode length (SawyerXYZEnv.max_path_length): its simulators refuse a step beyond it.
METAWORLD_HORIZON = 500
# The tables below are read through `env_default`, which files every Meta-World family under "metaworld".
DEFAULT_HORIZON = {"nav2d": 100, "cheetah-vel": 200, "cheetah-dir": 200, "metaworld": METAWORLD_HORIZON}
# Tasks per meta-iteration, as the paper's App. A.2: 20 for 2D navigation, 40 for the locomotion problems;
# Meta-World: 20, the meta-batch of its MAML-TRPO baselines and the default of its `make_ml_envs`.
DEFAULT_META_BATCH = {"nav2d": 20, "cheetah-vel": 40, "cheetah-dir": 40, "metaworld": 20}
TEST_BATCH_STEPS = 4000  # environment steps per test step in the paper's evaluation scripts
# Policy actions are divided by this before the environment clips them to its range. 2D navigation: 10,
# as the paper's code (cbfinn/maml_rl, maml_examples/maml_trpo_point.py) wraps the point environment in
# rllab's ``normalize``, which maps policy actions in [-1, 1] affinely onto the action box [-0.1, 0.1] and
# clips: a policy with σ = 1 then explores with steps of ±0.1 instead of being clipped almost always (with
# scale 1 the mean drifts far past the clip, where an inner gradient step no longer moves the agent).
# Half-cheetah: 10, as pytorch-maml-rl's HalfCheetahVel/Dir (``normalization_scale``): torque noise 0.1
# instead of flailing at the ±1 torque limits (see docs/rl.md).
# Meta-World: 10, as garage's MAML-TRPO on Meta-World (``normalize(..., expected_action_scale=10.)``): its
# actions are end-effector moves and a gripper command in [-1, 1].
DEFAULT_ACTION_SCALE = {"nav2d": 10.0, "cheetah-vel": 10.0, "cheetah-dir": 10.0, "metaworld": 10.0}
# What 0 ("the env's default") meant in checkpoints written before the defaults above were resolved and
# stored explicitly (nav2d was then 1).
LEGACY_ACTION_SCALE = {"nav2d": 1.0, "cheetah-vel": 10.0, "cheetah-dir": 10.0, "metaworld": 10.0}


def is_metaworld(env: str) -> bool:
    """Whether ``env`` names a Meta-World family (``ml10`` or ``ml1-<task>``); whether the task exists is
    the package's to say (:func:`mamlkit.rl.metaworld.check_env`), so this needs no import of it."""
    return env == "ml10" or (env.startswith("ml1-") and len(env) > 4
                             and all(c.isalnum() or c == "-" for c in env[4:]))


def is_env(env: str) -> bool:
    """Whether ``env`` is an environment name mamlkit knows the form of."""
    return env in ENV_NAMES or is_metaworld(env)


def env_default(table: dict[str, Any], env: str) -> Any:
    """``table``'s value for ``env``; every Meta-World family shares the entry ``"metaworld"``."""
    return table["metaworld" if is_metaworld(env) else env]


# The groups of `mamlkit rl train --help`, in order. Each field carries its group and its one line of help.
ENVIRONMENT, POLICY, INNER, OUTER, ESTIMATOR, EXECUTION, LOGGING = GROUPS = (
    "environment and sampling", "policy", "inner loop", "outer loop (TRPO)", "returns and gradient estimator",
    "execution", "logging, checkpoints and evaluation")


def _flag(default: Any, group: str, help: str) -> Any:
    return flag(default, group, help, GROUPS)


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Everything that defines a meta-RL run."""

    env: str = _flag("nav2d", ENVIRONMENT, "environment: nav2d | cheetah-vel | cheetah-dir | ml1-<task> | ml10 "
                     "(the ENV argument)")
    algo: str = _flag("maml-trpo", OUTER, "maml-trpo | pretrain (TRPO on all tasks jointly, no inner step; needs "
                      "--inner-steps 0)")
    # policy: Gaussian MLP, learned state-independent log σ
    hidden_sizes: tuple[int, ...] = _flag((100, 100), POLICY, "hidden layer widths of the Gaussian MLP policy")
    init_std: float = _flag(1.0, POLICY, "initial σ of the policy's actions (log σ is learned, state-independent)")
    # sampling
    horizon: int = _flag(0, ENVIRONMENT, "episode length (0: the env's value: 500 ML1/ML10, their limit; 100 "
                       "nav2d, 200 cheetah)")
    action_scale: float = _flag(0.0, ENVIRONMENT, "env action = policy action / scale, clipped to the env's range "
                                "(0: the env's default, 10)")
    traj_per_task: int = _flag(20, ENVIRONMENT, "episodes sampled per task and per inner step (paper: 20)")
    seed: int = _flag(0, ENVIRONMENT, "seed of the tasks (ML1/ML10: of the benchmark's goals), the sampling "
                    "noise and the initial policy")
    reward_version: str = _flag("v2", ENVIRONMENT, "ML1/ML10 reward functions: v2 (the benchmark's current) | v1 "
                                "(those environments only)")
    gamma: float = _flag(0.99, ESTIMATOR, "discount factor of the returns")
    gae_lambda: float = _flag(1.0, ESTIMATOR, "GAE λ (1: Monte-Carlo returns minus the linear baseline)")
    estimator: str = _flag("reinforce", ESTIMATOR, "inner loss in the meta-gradient: reinforce (paper) | lvc (ProMP) "
                           "| dice")
    # inner loop: REINFORCE with the linear feature baseline
    inner_lr: float = _flag(0.1, INNER, "α, the inner policy-gradient step size (paper: 0.1)")
    inner_steps: int = _flag(1, INNER, "inner steps per task during training: 1 (MAML) | 0 (only with --algo "
                             "pretrain)")
    first_order: bool = _flag(False, INNER, "drop second-order terms of the meta-gradient and the Fisher")
    # outer loop: TRPO
    meta_batch: int = _flag(0, OUTER, "tasks per meta-iteration (0: the env's paper value, 20 ML1/ML10, 20 "
                      "nav2d, 40 cheetah)")
    iterations: int = _flag(200, OUTER, "meta-iterations (TRPO steps) to train for")
    max_kl: float = _flag(0.01, OUTER, "δ, the trust region's bound on the mean KL")
    cg_iters: int = _flag(10, OUTER, "conjugate-gradient iterations solving F x = g")
    cg_damping: float = _flag(1e-5, OUTER, "λ added to the Fisher: (F + λI) v")
    ls_steps: int = _flag(15, OUTER, "backtracking line-search steps")
    ls_ratio: float = _flag(0.8, OUTER, "step shrink factor per backtrack, in (0, 1)")
    fisher_tasks: int = _flag(0, OUTER, "tasks whose KL gives the Fisher (0: all; fewer: faster, approximate)")
    fisher_fraction: float = _flag(0.2, OUTER, "fraction of post-update states in the Fisher's KL (1: all; 0.2: "
                                   "16% faster a meta-iteration on nav2d, the same returns on two seeds)")
    fast_fisher: bool = _flag(True, OUTER, "gradient and Fisher products task by task (same numbers, faster); "
                              "off: through the whole batch's graph")
    # execution
    dtype: str = _flag("float32", EXECUTION, "float32 | float64")
    threads: int = _flag(1, EXECUTION, "torch threads (0: torch's default, all cores)")
    dist_timeout: int = _flag(600, EXECUTION, "under torchrun: seconds a collective waits for the other ranks "
                              "before the job fails")
    # logging and checkpoints
    out_dir: str = _flag("runs", LOGGING, "folder that receives the run folder")
    run_name: str = _flag("", LOGGING, "the run folder's name (empty: rl-<env>-<algo>)")
    log_every: int = _flag(1, LOGGING, "log the returns, averaged over the last N iterations, to "
                           "metrics.jsonl every N iterations")
    checkpoint_every: int = _flag(10, LOGGING, "write a checkpoint every N iterations (and at the end)")
    progress: bool = _flag(True, LOGGING, "show a progress bar with the live returns")
    # validation: the 1-step return on held-out tasks; the best policy is kept as RUN/best.safetensors
    val_every: int = _flag(10, LOGGING, "validate every N iterations, keeping the best policy as "
                           "RUN/best.safetensors (0: never)")
    val_tasks: int = _flag(20, LOGGING, "fixed held-out validation tasks, traj_per_task episodes each")
    # evaluation
    eval_tasks: int = _flag(40, LOGGING, "fixed test tasks of the final evaluation (>= 40 for the report)")
    eval_traj: int = _flag(0, LOGGING, "episodes per test task and test step (0: 4,000 steps' worth, as the "
                           "paper's code tests: 40 nav2d, 20 cheetah)")
    eval_lrs: tuple[float, ...] = _flag((0.1, 0.05, 0.05), LOGGING, "α of test steps 1, 2, 3, ... (paper: 0.1 then "
                                        "0.05)")
    baselines: bool = _flag(True, LOGGING, "also evaluate a pretrained and a randomly initialised policy")
    pretrain_iterations: int = _flag(100, LOGGING, "TRPO iterations of the pretrained baseline")

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        refuse_non_finite(self)
        check_fields(as_dict(self))  # every count and size below its bound (mamlkit.base.limits)

        need(is_env(self.env), f"env must be one of {', '.join(ENV_NAMES)}, or a Meta-World family "
             f"({', '.join(METAWORLD_EXAMPLES)}, ...), got {self.env!r}")
        need(self.reward_version in REWARD_VERSIONS, f"reward_version must be one of {', '.join(REWARD_VERSIONS)} "
             f"(Meta-World's reward functions), got {self.reward_version!r}")
        need(self.reward_version == "v2" or is_metaworld(self.env),
             f"--reward-version applies to Meta-World environments only, not {self.env}; leave it out")
        need(not is_metaworld(self.env) or self.horizon <= METAWORLD_HORIZON,
             f"horizon must be <= {METAWORLD_HORIZON} for Meta-World (its episodes end there), got {self.horizon}")
        need(self.algo in ("maml-trpo", "pretrain"), f"algo must be maml-trpo or pretrain, got {self.algo!r}")
        need(self.estimator in ("reinforce", "lvc", "dice"),
             f"estimator must be reinforce, lvc or dice, got {self.estimator!r}")
        need(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("traj_per_task", "cg_iters", "ls_steps", "iterations", "log_every",
                     "checkpoint_every", "eval_tasks", "val_tasks"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.action_scale >= 0, f"action_scale must be >= 0 (0: the env's default), got {self.action_scale}")
        for name in ("meta_batch", "horizon", "threads", "pretrain_iterations", "fisher_tasks", "val_every",
                     "eval_traj"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.inner_steps in (0, 1), "inner_steps must be 0 or 1 during training (each RL inner step "
             f"needs fresh samples; evaluate more steps with --eval-lrs), got {self.inner_steps}")
        need((self.inner_steps == 0) == (self.algo == "pretrain"),
             "algo=pretrain trains without an inner step (inner_steps=0); maml-trpo needs inner_steps=1")
        need(all(h >= 1 for h in self.hidden_sizes),
             f"hidden_sizes must be positive, got {self.hidden_sizes}")
        need(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        need(0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1,
             "gamma must be in (0, 1] and gae_lambda in [0, 1]")
        need(self.inner_lr >= 0 and all(a >= 0 for a in self.eval_lrs), "inner_lr and eval_lrs must be >= 0")
        need(self.max_kl > 0 and self.cg_damping >= 0, "max_kl must be > 0 and cg_damping >= 0")
        need(0 < self.fisher_fraction <= 1, f"fisher_fraction must be in (0, 1], got {self.fisher_fraction}")
        need(self.dist_timeout >= 1, f"dist_timeout must be >= 1 second, got {self.dist_timeout}")
        need(0 < self.ls_ratio < 1, f"ls_ratio must be in (0, 1), got {self.ls_ratio}")

    @property
    def episode_len(self) -> int:
        return self.horizon or env_default(DEFAULT_HORIZON, self.env)

    @property
    def tasks_per_batch(self) -> int:
        """Tasks per meta-iteration: ``meta_batch``, or for 0 the paper's value for the env."""
        return self.meta_batch or env_default(DEFAULT_META_BATCH, self.env)

    @property
    def test_traj(self) -> int:
        """Episodes per test task and test step: ``eval_traj``, or for 0 the paper's code's test batch of
        4,000 steps (cbfinn/maml_rl test_maml_point.py and test_maml_cheetah_direc.py: ``batch_size=4000``)."""
        return self.eval_traj or max(1, TEST_BATCH_STEPS // self.episode_len)

    @property
    def env_action_scale(self) -> float:
        return self.action_scale or env_default(DEFAULT_ACTION_SCALE, self.env)

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)

    def replace(self, **changes: Any) -> RLConfig:
        return from_dict({**self.to_dict(), **changes})


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(RLConfig)


def from_dict(values: dict[str, Any]) -> RLConfig:
    """Build a config from a dict, rejecting unknown keys with the list of valid ones."""
    return build_config(RLConfig, values, "rl config")
