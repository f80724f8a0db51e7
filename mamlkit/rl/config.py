"""Meta-RL run configuration: one frozen, keyword-only dataclass, checked on construction.

Every field is a flag of ``mamlkit rl train`` (``inner_lr`` -> ``--inner-lr``). Defaults are the
paper's 2D-navigation setting (Finn et al. 2017, §5.3 and App. A.2). As :class:`mamlkit.config.TrainConfig`,
it holds the generic fields and ``options``, the options of the plug-ins it chooses (:mod:`mamlkit.base.options`):
its RL algorithm's (``--algo``: TRPO's, :mod:`mamlkit.rl.options`) and its environment family's
(:mod:`mamlkit.rl.families`: Meta-World's ``reward_version``), read as attributes (``cfg.max_kl``) and written
as flat keys; an option neither reads is refused, naming its owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mamlkit import config
from mamlkit.base.options import need
from mamlkit.rl.families import EnvFamily, family_of
from mamlkit.rl.options import ENVIRONMENT, ESTIMATOR, EXECUTION, GROUPS, INNER, LOGGING, OUTER, POLICY, rl_option

ConfigError = config.ConfigError
_flag = rl_option


@dataclass(frozen=True, kw_only=True, init=False)
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

    # the options of the chosen RL algorithm and environment family (mamlkit.base.options), in that order
    options: tuple[Any, ...] = field(default=())

    def __init__(self, **values: Any) -> None:
        config.fill(self, values, loose=())

    __getattr__ = config.option_attribute  # cfg.max_kl: an option of the chosen plug-ins, else its default

    def __post_init__(self) -> None:
        config.check_values(self)
        family = self.family  # an unknown env was refused when the plug-ins were chosen
        need(family.max_horizon is None or self.horizon <= family.max_horizon,
             f"horizon must be <= {family.max_horizon} for {family.name} (its episodes end there), got {self.horizon}")
        need(self.algo in ("maml-trpo", "pretrain"), f"algo must be maml-trpo or pretrain, got {self.algo!r}")
        need(self.estimator in ("reinforce", "lvc", "dice"),
             f"estimator must be reinforce, lvc or dice, got {self.estimator!r}")
        need(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("traj_per_task", "iterations", "log_every", "checkpoint_every", "eval_tasks", "val_tasks"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.action_scale >= 0, f"action_scale must be >= 0 (0: the env's default), got {self.action_scale}")
        for name in ("meta_batch", "horizon", "threads", "pretrain_iterations", "val_every", "eval_traj"):
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
        need(self.dist_timeout >= 1, f"dist_timeout must be >= 1 second, got {self.dist_timeout}")
        config.check_options(self)

    @property
    def family(self) -> EnvFamily:
        """The environment family of ``env`` (:mod:`mamlkit.rl.families`)."""
        return family_of(self.env)

    @property
    def episode_len(self) -> int:
        return self.horizon or self.family.horizon

    @property
    def tasks_per_batch(self) -> int:
        """Tasks per meta-iteration: ``meta_batch``, or for 0 the paper's value for the env."""
        return self.meta_batch or self.family.meta_batch

    @property
    def test_traj(self) -> int:
        """Episodes per test task and test step: ``eval_traj``, or for 0 the family's test batch in steps (the
        paper's code's 4,000) over the episode length."""
        return self.eval_traj or max(1, self.family.test_steps // self.episode_len)

    @property
    def env_action_scale(self) -> float:
        return self.action_scale or self.family.action_scale

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping of every generic field and every option of the chosen plug-ins (config.json)."""
        return config.flat_dict(self)

    def replace(self, **changes: Any) -> RLConfig:
        """This config with ``changes``; options a newly chosen plug-in does not read are dropped, while a change
        it does not read is refused."""
        return config.replaced(self, changes)


RLConfig.choices = config.Choices(("rl-algo", "env"),
                                  lambda cfg: (("rl-algo", cfg.algo), ("env", family_of(cfg.env).name)), "rl config")


def field_types() -> dict[str, Any]:
    """The type of every RL config key: the generic fields, then every RL plug-in's options."""
    return config.field_types(RLConfig)


def from_dict(values: dict[str, Any], loose: tuple[str, ...] = ()) -> RLConfig:
    """Build a config from a flat dict, rejecting unknown keys with the list of valid ones and the options the
    chosen algorithm and environment family do not read (but those in ``loose``, which are dropped)."""
    return config.from_dict(values, loose, cls=RLConfig)


def from_stored(values: dict[str, Any]) -> RLConfig:
    """The config a run stored (config.json, a checkpoint's state): written when every option was a field of
    every RL config, it holds the options of plug-ins the run did not choose (``reward_version`` of a nav2d
    run); those at their default are dropped, any other value refused (:func:`mamlkit.config.from_stored`)."""
    return config.from_stored(values, cls=RLConfig)


__all__ = ["RLConfig", "ConfigError", "GROUPS", "ENVIRONMENT", "POLICY", "INNER", "OUTER", "ESTIMATOR", "EXECUTION",
           "LOGGING", "field_types", "from_dict", "from_stored"]
