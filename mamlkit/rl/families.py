"""The RL environment families: one :class:`EnvFamily` per family, registered with
:func:`register_env_family`. A family carries everything a run needs to know about its environments: how to
build them and draw their tasks, its defaults (episode length, meta-batch, action scale), its report and its
`rl adapt`, and the options only it reads (:mod:`mamlkit.base.options`, kind ``env``). Code elsewhere looks the
family up (:func:`family_of`) instead of asking for an environment by name.

A light module (no torch), listed in :data:`mamlkit.PLUGINS`: the hooks are dotted names (``module:function``),
imported on first use, so ``mamlkit rl train --help`` and config building import no simulator. A family
outside the package passes functions instead and registers itself before it builds a config that names it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mamlkit.base.options import need, register_options, unregister_options
from mamlkit.rl.options import ENVIRONMENT, rl_option

# A function, or its dotted name ``module:function``, imported on first use; None: the family has none.
Hook = str | Callable[..., Any] | None


@dataclass(frozen=True)
class EnvFamily:
    """One family of RL environments. Required: ``name``; ``make(env, tasks, num_envs, horizon, action_scale,
    **options)``, a ``[T, N]`` environment (:class:`mamlkit.rl.envs.TaskEnv`) for task parameters ``tasks
    [T, d]`` with N copies each, ``options`` the values of the family's own ``options`` classes;
    ``sample(env, num_tasks, generator, split, seed)``, task parameters ``[T, d]`` whose every number comes
    from ``generator`` (``split`` and ``seed`` for families whose tasks are fixed lists); ``dims``, ``(obs_dim,
    act_dim)``; ``horizon`` and ``meta_batch``, what 0 means for ``--horizon`` and ``--meta-batch``."""

    name: str  # how flags' help and messages name it
    make: Hook
    sample: Hook
    dims: tuple[int, int]
    horizon: int
    meta_batch: int
    # the environments it serves: ``matches(env)``, else its name alone; ``about``: how help names them
    matches: Callable[[str], bool] | None = None
    about: str = ""
    examples: tuple[str, ...] = ()  # names an error message offers (a family of many: a few)
    # env action = policy action / scale, clipped to ±action_limit; legacy: what 0 meant in checkpoints
    # written before the scale was stored explicitly
    action_scale: float = 10.0
    legacy_action_scale: float | None = None
    action_limit: float = 1.0
    max_horizon: int | None = None  # episodes end there (its simulators refuse a step beyond it)
    test_steps: int = 4000  # environment steps per test task and test step when --eval-traj is 0
    paper: tuple[float, ...] | None = None  # the paper's MAML returns after 0..3 steps, beside the report's
    trajectories: bool = False  # its report draws the agents' paths in the plane (the paper's figure 4)
    report: Hook = None  # (out_dir, policy, cfg, steps, eval_episodes) -> table: its own evaluation, no baselines
    adapt: str | None = None  # what `rl adapt` gives it: "goal-2d" (--goal X Y) | "metaworld"; None: refused
    shipped: str | None = None  # a meta-trained policy in mamlkit/assets/ (`rl adapt NAME`)
    check: Hook = None  # (env): refuse an environment the installed packages lack
    check_train: Hook = None  # (tasks): refuse a task training must never see (a benchmark's test split)
    record: Hook = None  # (env, **options) -> what checkpoints and reports record beyond the config
    options: tuple[type, ...] = ()

    def serves(self, env: str) -> bool:
        return self.matches(env) if self.matches is not None else env == self.name

    def settings(self, cfg: Any) -> dict[str, Any]:
        """The values of this family's own options in ``cfg`` (what ``make`` and ``record`` take)."""
        return {f.name: getattr(cfg, f.name) for c in self.options for f in dataclasses.fields(c)}


ENV_FAMILIES: dict[str, EnvFamily] = {}


def register_env_family(family: EnvFamily) -> EnvFamily:
    """Add ``family`` (replacing one of its name) and register its options under kind ``env``."""
    ENV_FAMILIES[family.name] = family
    register_options("env", family.name, *family.options)
    return family


def unregister_env_family(name: str) -> None:
    """Forget the family ``name`` and its options (a family registered for a while, as a test's)."""
    ENV_FAMILIES.pop(name, None)
    unregister_options("env", name)


def find_family(env: str) -> EnvFamily | None:
    """The family that serves environment ``env``, or None."""
    if not isinstance(env, str):
        return None
    return next((f for f in ENV_FAMILIES.values() if f.serves(env)), None)


def family_of(env: str) -> EnvFamily:
    """The family that serves environment ``env``; a ConfigError naming the known ones otherwise."""
    family = find_family(env)
    need(family is not None, f"env must be one of {known()}, got {env!r}")
    return family


def known() -> str:
    """The environments of every family, as a message offers them."""
    return ", ".join(f.about or f.name for f in ENV_FAMILIES.values())


def examples() -> tuple[str, ...]:
    """Names of environments to offer (every family's own, or its examples)."""
    return tuple(n for f in ENV_FAMILIES.values() for n in (f.examples or (f.name,)))


def hook(fn: Hook) -> Callable[..., Any]:
    """A family's hook as a function: a dotted ``module:function`` is imported now."""
    if isinstance(fn, str):
        module, _, name = fn.partition(":")
        return getattr(importlib.import_module(module), name)
    if fn is None:
        raise ValueError("the environment family has no such hook; ask for it only where it is not None")
    return fn


# ---------------------------------------------------------------- the built-in families

def _is_metaworld(env: str) -> bool:
    """``ml10`` or ``ml1-<task>``; whether the task exists is the package's to say
    (:func:`mamlkit.rl.metaworld.check_env`), so this needs no import of it."""
    return env == "ml10" or (env.startswith("ml1-") and len(env) > 4 and all(c.isalnum() or c == "-" for c in env[4:]))


REWARD_VERSIONS = ("v2", "v1")  # Meta-World's reward functions; v2 is the benchmark's current one


@dataclass(frozen=True, kw_only=True)
class MetaWorldOptions:
    """What only Meta-World's families read."""

    reward_version: str = rl_option("v2", ENVIRONMENT, "ML1/ML10 reward functions: v2 (the benchmark's current) | "
                                    "v1 (those environments only)")

    def __post_init__(self) -> None:
        need(self.reward_version in REWARD_VERSIONS, f"reward_version must be one of {', '.join(REWARD_VERSIONS)} "
             f"(Meta-World's reward functions), got {self.reward_version!r}")


# Action scales. 2D navigation: 10, as the paper's code (cbfinn/maml_rl, maml_examples/maml_trpo_point.py) wraps
# the point environment in rllab's ``normalize``, which maps policy actions in [-1, 1] affinely onto the action
# box [-0.1, 0.1] and clips: a policy with σ = 1 then explores with steps of ±0.1 instead of being clipped almost
# always (with scale 1 the mean drifts far past the clip, where an inner gradient step no longer moves the
# agent); checkpoints whose scale was 0 meant 1. Half-cheetah: 10, as pytorch-maml-rl's HalfCheetahVel/Dir
# (``normalization_scale``): torque noise 0.1 instead of flailing at the ±1 torque limits (see docs/rl.md).
# Meta-World: 10, as garage's MAML-TRPO on Meta-World (``normalize(..., expected_action_scale=10.)``): its
# actions are end-effector moves and a gripper command in [-1, 1].
# Tasks per meta-iteration, as the paper's App. A.2: 20 for 2D navigation, 40 for the locomotion problems;
# Meta-World: 20, the meta-batch of its MAML-TRPO baselines and the default of its `make_ml_envs`.
# Test episodes: the paper's code's test batch of 4,000 steps (cbfinn/maml_rl test_maml_point.py and
# test_maml_cheetah_direc.py: ``batch_size=4000``). Paper returns: Finn et al. 2017, MAML after 0..3 steps,
# Table 4 (2D navigation), Table 5 (half-cheetah forward/backward).
register_env_family(EnvFamily(
    "nav2d", "mamlkit.rl.envs:make_nav2d", "mamlkit.rl.envs:nav2d_tasks", dims=(2, 2), horizon=100, meta_batch=20,
    legacy_action_scale=1.0, action_limit=0.1, paper=(-40.41, -11.68, -3.33, -3.23), trajectories=True,
    adapt="goal-2d", shipped="nav2d-maml-trpo.safetensors"))
# gymnasium HalfCheetah-v5: 17 observations (x excluded), 6 torques
register_env_family(EnvFamily(
    "cheetah-vel", "mamlkit.rl.cheetah:HalfCheetahTasks", "mamlkit.rl.envs:cheetah_vel_tasks", dims=(17, 6),
    horizon=200, meta_batch=40))
register_env_family(EnvFamily(
    "cheetah-dir", "mamlkit.rl.cheetah:HalfCheetahTasks", "mamlkit.rl.envs:cheetah_dir_tasks", dims=(17, 6),
    horizon=200, meta_batch=40, paper=(-50.69, 293.19, 313.48, 315.65)))
# Meta-World (the optional `metaworld` extra, mamlkit.rl.metaworld): `ml1-<task>` for any ML1 task of the
# benchmark and `ml10`. Every Sawyer task observes 39 numbers (hand, gripper, two objects' poses, the previous
# frame, hidden goal) and acts with 4; its episodes end at 500 steps (SawyerXYZEnv.max_path_length).
METAWORLD = register_env_family(EnvFamily(
    "Meta-World", "mamlkit.rl.metaworld:MetaWorldTasks", "mamlkit.rl.metaworld:sample_tasks", dims=(39, 4),
    horizon=500, meta_batch=20, matches=_is_metaworld,
    about="Meta-World's ml1-reach, ml1-push, ml1-pick-place, ml10, ml1-<task> (pip install 'mamlkit[metaworld]')",
    examples=("ml1-reach", "ml1-push", "ml1-pick-place", "ml10"), max_horizon=500,
    report="mamlkit.rl.metaworld_eval:report", adapt="metaworld", check="mamlkit.rl.metaworld:check_env",
    check_train="mamlkit.rl.metaworld:check_train_tasks", record="mamlkit.rl.metaworld:record",
    options=(MetaWorldOptions,)))

__all__ = ["EnvFamily", "ENV_FAMILIES", "register_env_family", "unregister_env_family", "find_family", "family_of",
           "known", "examples", "hook", "MetaWorldOptions", "REWARD_VERSIONS"]
