"""A fresh clone, without any data beside it, passes the README's test command.

The README's command (b) installs the package and runs `ruff check . && pytest -q`. Here the install is
the running interpreter's (its environment already holds the dependencies), and the rest runs in a copy
of the repository's files in a temporary folder: no data set beside it, no `MAMLKIT_DATA`, an empty
default data root. Tests that need real data must skip there, and nothing may fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATASETS, REQUIRE_DATA_ENV, ROOT
from helpers import copy_repository

# None reads data (the model zoo, exactness, output and torchrun meta-RL tests build their models and tasks in
# memory; Meta-World's come from its optional extra): running them again in the copy would only add minutes.
NOT_AGAIN = ("tests/test_fresh_clone.py", "tests/test_wheel.py", "tests/test_model_zoo.py", "tests/test_exactness.py",
             "tests/test_outputs.py", "tests/test_rl_distributed.py", "tests/test_metaworld.py")


def test_no_test_reads_data_beside_the_repository():
    """Real data comes through the `omniglot_dir`/`clinc_dir` fixtures (tests/conftest.py), never a path."""
    for path in sorted((ROOT / "tests").glob("*.py")):
        source = path.read_text()
        if path.name not in ("test_fresh_clone.py", "test_readme.py"):  # these two say where CI keeps it
            assert not re.search(r"shared[\"']?\s*/\s*[\"']?data", source), path.name


@pytest.mark.slow
def test_fresh_clone_passes_the_readme_test_command(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: there is no clone to imitate")
    clone = copy_repository(tmp_path / "mamlkit")
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("MAMLKIT_DATA", REQUIRE_DATA_ENV, "MAMLKIT_CACHE")}
    env.update(PYTHONPATH=str(clone), XDG_CACHE_HOME=str(tmp_path / "home-cache"), PYTHONDONTWRITEBYTECODE="1")

    def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=timeout)

    where = run("-c", "import mamlkit; print(mamlkit.__file__)", timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(clone), where.stdout + where.stderr  # the copy's code
    lint = run("-m", "ruff", "check", ".", timeout=300)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    proc = run("-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"--ignore={p}" for p in NOT_AGAIN),
               timeout=3000)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and not re.search(r"failed|error", summary), proc.stdout[-6000:] + proc.stderr
    assert re.search(r"\d+ passed", summary), summary
    for name in DATASETS:  # each missing data set is named once, with how to get it
        line = [x for x in proc.stdout.splitlines() if x.startswith("skipped ") and f"{name} not found" in x]
        assert len(line) == 1 and f"mamlkit data {name}" in line[0] and "MAMLKIT_DATA" in line[0], proc.stdout
