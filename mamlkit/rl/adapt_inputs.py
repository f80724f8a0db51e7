"""What `mamlkit rl adapt` is pointed at, known without torch (the command line's help reads it): the policies
shipped with mamlkit, and the arena of nav2d's goals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mamlkit.base.errors import UserError
from mamlkit.rl import families

ARENA = (-0.5, 0.5)  # nav2d goals are drawn from U[-0.5, 0.5]² (paper §5.3); a policy knows no others
# policies in mamlkit/assets/ (see docs/rl.md), by the family that ships them
SHIPPED = {f.name: f.shipped for f in families.ENV_FAMILIES.values() if f.shipped}


def shipped_policy(name: str) -> Path:
    """The path of the meta-trained policy ``name`` that ships with the package."""
    path = Path(__file__).resolve().parents[1] / "assets" / SHIPPED[name]  # mamlkit/assets
    if not path.exists():
        raise UserError(f"the shipped {name} policy is missing from this installation ({path}); "
                        "pass a run folder or checkpoint of `mamlkit rl train nav2d` instead")
    return path


def check_2d_goal(goal: Sequence[float] | None) -> None:
    """Refuse a 2-number ``--goal`` outside the nav2d arena (any other goal is its environment's to check)."""
    if goal is not None and len(goal) == 2:
        x, y = goal
        if not all(math.isfinite(v) and ARENA[0] <= v <= ARENA[1] for v in (x, y)):
            raise UserError(f"--goal {x:g} {y:g} is outside the arena: each coordinate must be in "
                            f"[{ARENA[0]}, {ARENA[1]}], the range of the goals the policy was meta-trained on")
