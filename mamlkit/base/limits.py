"""Every bound on a count, size, pattern or document that mamlkit reads from a user or a file, in one place.

A number in a config, a checkpoint or a YAML file decides how long a loop runs and how much is allocated,
and a file may come from someone else: ``test_inner_steps: 1e9`` in a checkpoint would adapt for ever.
So each such number is checked against a generous but finite bound before it is used, and refused with
a message that names the field and the bound (``UserError``: exit 2 from the CLI). The bounds are far above
every published setting (MAML: 10 inner steps, 600 test tasks; the largest presets here: 100 steps, 32
tasks); what fits in memory is checked separately (:func:`mamlkit.models.check_run_memory`).
docs/reliability.md lists them with the tests that hold them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mamlkit.base.errors import UserError


class LimitError(UserError, ValueError):
    """A count, size, pattern or document over its bound (the message names it and the bound)."""

# Inner steps (training, test time, `mamlkit adapt --steps`, Reptile's, iMAML's CG iterations, eval steps).
MAX_STEPS = 10_000
# Tasks: per meta-batch, per validation, per final evaluation, per backward chunk.
MAX_TASKS = 100_000
# Meta-iterations, and the every-N-iterations settings.
MAX_ITERATIONS = 1_000_000_000
# Classes per task, examples per class (or per regression task), query points of an evaluation task.
MAX_WAYS = 10_000
MAX_SHOTS = 100_000
# Model sizes: hidden layers, a layer's width, Conv channels, an image side in pixels, tokens per text.
MAX_LAYERS = 1_000
MAX_WIDTH = 1_000_000
MAX_IMAGE_SIZE = 10_000
MAX_TOKENS = 100_000
# Steps of one meta-RL episode.
MAX_HORIZON = 1_000_000
# Entries of a list setting (eval steps, eval shots, baseline rates, CSV features, task split).
MAX_LIST = 1_000
# `--threads`: at most this many times the machine's cores (torch segfaults with 100,000).
THREADS_PER_CORE = 4
MAX_THREADS = 4_096  # what a config or checkpoint may record, whatever machine reads it
# Parameter-name patterns (`--adapt`): how many, how long, the automaton's size, the name's length.
MAX_PATTERNS = 100
MAX_PATTERN_LENGTH = 1_000
MAX_PATTERN_STATES = 10_000
MAX_NAME_LENGTH = 1_000
# A YAML config (`--config`): its size, and its nesting depth. Aliases (`*name`) are refused outright: they
# expand a few lines into gigabytes ("billion laughs").
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
# A checkpoint's JSON records (its state and its tensor digests): their size, and their nesting depth (a state
# nests a model spec's lists a few levels deep; json's parser recurses once per level).
MAX_STATE_BYTES = 32 << 20
MAX_STATE_DEPTH = 32
# CSV tables. A table read whole (`mamlkit adapt`'s support and query files, rows passed to `mamlkit.load`):
# its size in bytes and its rows. Any table, a streamed meta-training file included: its columns, and the
# characters of one cell (Python's csv module refuses longer fields by default; the columnar reader is held
# to the same bound, so both readers accept the same files).
MAX_TABLE_BYTES = 256 << 20
MAX_TABLE_ROWS = 1_000_000
MAX_TABLE_COLUMNS = 100_000
MAX_CELL_CHARS = 131_072
# Seconds a collective may wait for the other ranks (one week).
MAX_TIMEOUT_S = 7 * 24 * 3600

# The bound of every integer field of the configs (TrainConfig, RLConfig) that sets a count or a size; a
# tuple field's bound applies to each entry, and MAX_LIST to how many there are.
FIELD_BOUNDS: dict[str, int] = {
    "inner_steps": MAX_STEPS, "test_inner_steps": MAX_STEPS, "reptile_inner_steps": MAX_STEPS,
    "cg_steps": MAX_STEPS, "eval_steps": MAX_STEPS, "meta_batch": MAX_TASKS, "val_tasks": MAX_TASKS,
    "eval_tasks": MAX_TASKS, "chunk_size": MAX_TASKS, "iterations": MAX_ITERATIONS,
    "log_every": MAX_ITERATIONS, "val_every": MAX_ITERATIONS, "checkpoint_every": MAX_ITERATIONS,
    "msl_epochs": MAX_ITERATIONS, "first_order_epochs": MAX_ITERATIONS, "epoch_iterations": MAX_ITERATIONS,
    "n_way": MAX_WAYS, "k_shot": MAX_SHOTS, "k_query": MAX_SHOTS, "eval_shots": MAX_SHOTS,
    "eval_query": MAX_SHOTS, "hidden_sizes": MAX_WIDTH, "filters": MAX_WIDTH, "image_size": MAX_IMAGE_SIZE,
    "text_max_tokens": MAX_TOKENS, "max_categories": MAX_WIDTH, "threads": MAX_THREADS,
    "dist_timeout": MAX_TIMEOUT_S,
    # meta-RL (mamlkit rl train)
    "horizon": MAX_HORIZON, "traj_per_task": MAX_TASKS, "cg_iters": MAX_STEPS, "ls_steps": MAX_STEPS,
    "fisher_tasks": MAX_TASKS, "eval_traj": MAX_TASKS, "pretrain_iterations": MAX_ITERATIONS,
}


def check_count(name: str, value: Any, limit: int) -> None:
    """Refuse ``value`` above ``limit`` (a count or size named ``name``), with the bound in the message."""
    if isinstance(value, (int, float)) and value > limit:
        raise LimitError(f"{name} is {value:,}, above the limit of {limit:,}; use a smaller value (every count "
                         "and size mamlkit reads from flags and files is bounded: docs/reliability.md, Bounds)")


def check_fields(values: Mapping[str, Any], bounds: Mapping[str, int] = FIELD_BOUNDS) -> None:
    """Check every field of ``values`` (a config as a dict) that ``bounds`` names; tuple fields entry by entry,
    and every list field's length against MAX_LIST."""
    for name, value in values.items():
        if isinstance(value, (list, tuple)):
            if len(value) > MAX_LIST:
                raise LimitError(f"{name} has {len(value):,} entries, above the limit of {MAX_LIST:,}")
            if name in bounds:
                for v in value:
                    check_count(name, v, bounds[name])
        elif name in bounds:
            check_count(name, value, bounds[name])


def max_threads() -> int:
    """The most threads ``--threads`` may ask for on this machine: THREADS_PER_CORE per core."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def check_threads(requested: int) -> None:
    """Refuse ``--threads`` above :func:`max_threads` before torch sees it (torch crashes on 100,000). Checked
    where threads are set, not in the config: a checkpoint written on a larger machine stays loadable, and
    ``--threads`` may change on resume."""
    if requested > max_threads():
        raise LimitError(f"--threads {requested:,} is more than {THREADS_PER_CORE} per core of this machine's "
                         f"{os.cpu_count() or 1} (at most {max_threads()}); use --threads 0 to let mamlkit choose")


__all__ = ["LimitError", "FIELD_BOUNDS", "check_count", "check_fields", "check_threads", "max_threads"]
