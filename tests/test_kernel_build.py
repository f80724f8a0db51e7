"""How mamlkit.exec.kernels is built: its C source compiles without a warning, ships as package data, and a
machine that cannot build it is told so, once, in a warning that the CLI and the Python API both show."""

import fnmatch
import logging
import os
import shutil
import subprocess
import sys

import pytest
import tomllib
import torch
import torch.nn.functional as F
from conftest import ROOT
from helpers import needs_compiler

from mamlkit.exec import kernels


@needs_compiler
@pytest.mark.parametrize("arch", kernels._ARCHES, ids=lambda a: " ".join(a) or "portable")
def test_the_c_source_builds_with_warnings_as_errors(tmp_path, arch):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    lib, proc = kernels._compile(cc, str(tmp_path), arch, ("-Wall", "-Wextra", "-Werror"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert os.path.getsize(lib) > 0


def test_the_c_source_ships_as_package_data():
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    patterns = package_data.get("mamlkit.exec.kernels", [])
    for name in kernels._SOURCES:
        assert (ROOT / "mamlkit" / "exec" / "kernels" / name).is_file()
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is not in the wheel's package data"


@pytest.fixture
def unbuilt(monkeypatch):
    """The kernels enabled and not built yet in this process."""
    monkeypatch.setattr(kernels, "_lib", False)
    monkeypatch.setattr(kernels, "_enabled", True)


@pytest.mark.parametrize("compiler", ["missing binary", "none on PATH"])
def test_without_a_compiler_the_fallback_is_a_warning_given_once(unbuilt, monkeypatch, caplog, compiler):
    if compiler == "missing binary":
        monkeypatch.setenv("CC", "/nonexistent/cc")
    else:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", "")
    with caplog.at_level(logging.INFO, logger="mamlkit"):
        assert not kernels.available()
        assert not kernels.available()
        with kernels.fast():
            pass
    records = [r for r in caplog.records if r.name == "mamlkit"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "slower" in records[0].getMessage() and "C compiler" in records[0].getMessage()


@pytest.mark.parametrize("caller", ["python", "cli"])
def test_the_fallback_warning_is_on_stderr_once(tmp_path, caller):
    """The Python API with logging left as it is, and `mamlkit train` (which shows warnings, not info)."""
    if caller == "python":
        args = ["-c", "from mamlkit.exec import kernels; kernels.available(); kernels.available()"]
    else:
        args = ["-m", "mamlkit", "train", "sinusoid", "--strategy", "loop", "--iterations", "2", "--out-dir",
                str(tmp_path), "--no-progress", "--no-tensorboard", "--no-compare-pretrained", "--eval-tasks", "2",
                "--val-tasks", "2"]
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "PYTHONPATH": str(ROOT), "MAMLKIT_FAST_KERNELS": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("slower NCHW CPU kernels") == 1, proc.stderr


@needs_compiler
def test_the_dispatcher_sees_each_kernel_call_by_name(kernels_on):
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with torch.profiler.profile() as prof, kernels.fast():
        F.max_pool2d(F.relu(F.batch_norm(x, None, None, training=True)), 2).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"mamlkit::batch_norm", "mamlkit::batch_norm_relu_max_pool",
            "mamlkit::batch_norm_relu_max_pool_backward"} <= names, sorted(n for n in names if "mamlkit" in n)
