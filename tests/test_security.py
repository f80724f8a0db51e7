"""A file never makes mamlkit run code: checkpoints, adapted-model files and configs name a user's model
factory, and mamlkit imports it only when the user names it again or allows the file's code on this
command. Every test asserts that a marker file the hostile code would write never appears."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mamlkit
from mamlkit import checkpoint
from mamlkit.models import UntrustedModelCode, approve_model_code, check_factory_name
from mamlkit.use import api

FAST = ["--iterations", "2", "--meta-batch", "2", "--log-every", "1", "--val-every", "2", "--val-tasks", "2",
        "--eval-tasks", "2", "--eval-query", "5", "--eval-steps", "0", "1", "--eval-shots", "5",
        "--no-compare-pretrained", "--no-progress", "--no-tensorboard", "--strategy", "loop"]

# A user's package whose import and whose factory each leave a marker: importing it is running its code.
PACKAGE = textwrap.dedent("""
    import os
    from pathlib import Path

    from torch import nn

    Path(os.environ["MAMLKIT_TEST_MARKER"] + ".import").touch()


    def make(width=8):
        Path(os.environ["MAMLKIT_TEST_MARKER"] + ".call").touch()
        return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
""")

HUBCONF = textwrap.dedent("""
    import os
    from pathlib import Path

    Path(os.environ["MAMLKIT_TEST_MARKER"] + ".hub").touch()


    def net(**kwargs):
        from torch import nn
        return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
""")


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "PWNED"
    monkeypatch.setenv("MAMLKIT_TEST_MARKER", str(path))
    return path


def markers(marker: Path) -> list[str]:
    """Every file the hostile code may have written (the marker itself, or its suffixed forms)."""
    return sorted(p.name for p in marker.parent.glob(marker.name + "*"))


@pytest.fixture
def userpkg(tmp_path, monkeypatch, marker):
    root = tmp_path / "site"
    (root / "evilpkg").mkdir(parents=True)
    (root / "evilpkg" / "__init__.py").write_text("")
    (root / "evilpkg" / "boom.py").write_text(PACKAGE)
    monkeypatch.syspath_prepend(str(root))
    yield "evilpkg.boom:make"
    for name in [m for m in sys.modules if m.startswith("evilpkg")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small trained sinusoid run of mamlkit's own model, whose checkpoint the tests rewrite."""
    from mamlkit.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "sinusoid", "--out-dir", str(out), *FAST]) == 0
    return out / "sinusoid-maml"


def hostile_copy(run_dir: Path, dest: Path, spec: dict | None = None, model: str | None = None,
                 model_args: str = "") -> Path:
    """A copy of ``run_dir``'s checkpoint whose records of the model name ``spec`` / config ``model``."""
    tensors, state = checkpoint.load(run_dir / "checkpoint.safetensors")
    if spec is not None:
        state["model_spec"] = spec
    if model is not None:
        state["config"] = {**state["config"], "model": model, "model_args": model_args}
    dest.mkdir(parents=True, exist_ok=True)
    checkpoint.save(dest / "checkpoint.safetensors", tensors, state)
    return dest


def factory(name: str, **args) -> dict:
    return {"name": "factory", "factory": name, "args": args}


def regression_csvs(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "s.csv").write_text("x,y\n0.1,0.2\n0.5,0.4\n")
    (tmp_path / "q.csv").write_text("x\n0.3\n")
    return str(tmp_path / "s.csv"), str(tmp_path / "q.csv")


STDLIB_ATTACKS = [
    factory("os:system", command="touch {marker}"),
    factory("subprocess:run", args=["touch", "{marker}"]),
    factory("builtins:open", file="{marker}", mode="w"),
    factory("runpy:run_path", path_name="{marker}.py"),
    factory("torch.hub:load", repo_or_dir="{hub}", model="net", source="local"),
]


def _fill(spec: dict, marker: Path, hub: Path) -> dict:
    args = {k: (v.format(marker=marker, hub=hub) if isinstance(v, str) else
                [a.format(marker=marker, hub=hub) for a in v]) for k, v in spec["args"].items()}
    return {**spec, "args": args}


@pytest.mark.parametrize("attack", STDLIB_ATTACKS, ids=lambda s: s["factory"])
@pytest.mark.parametrize("trust", [False, True], ids=["plain", "trusted"])
def test_eval_adapt_and_resume_never_call_a_stdlib_or_hub_factory(cli, run_dir, tmp_path, marker, attack, trust):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(HUBCONF)
    (Path(str(marker) + ".py")).write_text(f"open({str(marker)!r} + '.runpy', 'w')\n")
    bad = hostile_copy(run_dir, tmp_path / "bad", _fill(attack, marker, hub))
    flag = ["--trust-model-code"] if trust else []
    support, query = regression_csvs(tmp_path)
    for argv in (["eval", bad, "--out", tmp_path / "rep", *flag], ["adapt", bad, "--support", support, "--query",
                                                                     query, *flag],
                 ["train", "--resume", bad, "--iterations", "3", *flag]):
        code, _, err = cli(*argv)
        assert code == 2, (argv, err)
        assert attack["factory"] in err and "never called to build a model" in err and "Traceback" not in err
    with pytest.raises(mamlkit.models.ModelSpecError, match="never called to build a model"):
        mamlkit.load(bad, trust_model_code=trust)
    assert markers(marker) == [marker.name + ".py"]  # only the script the attack would have run


def test_a_users_factory_is_imported_only_when_named_or_trusted(cli, run_dir, tmp_path, marker, userpkg):
    bad = hostile_copy(run_dir, tmp_path / "run", factory(userpkg, width=40), model=userpkg,
                       model_args='{"width": 40}')
    support, query = regression_csvs(tmp_path)
    cases = [["eval", bad, "--out", tmp_path / "rep"], ["adapt", bad, "--support", support, "--query", query],
             ["train", "--resume", bad, "--iterations", "3"]]
    for argv in cases:
        code, _, err = cli(*argv)
        assert code == 2, (argv, err)
        assert f"'{userpkg}'" in err and f"--model {userpkg}" in err and "--trust-model-code" in err
        assert "Traceback" not in err
    with pytest.raises(UntrustedModelCode, match="evilpkg.boom:make"):
        mamlkit.load(bad)
    with pytest.raises(UntrustedModelCode, match="you named 'evilpkg.boom:other'"):
        mamlkit.load(bad, model="evilpkg.boom:other")
    assert markers(marker) == []  # nothing imported, nothing called: not even the memory estimate ran it
    # Named again, or allowed: the same files load, and the allowed import is announced.
    learner = mamlkit.load(bad, model=userpkg)
    assert isinstance(learner, api.Learner) and markers(marker) == ["PWNED.call", "PWNED.import"]
    code, _, err = cli("eval", bad, "--out", tmp_path / "rep2", "--trust-model-code")
    assert code == 0, err
    assert f"importing {userpkg} (--trust-model-code)" in err
    code, _, err = cli("adapt", bad, "--support", support, "--query", query, "--model", userpkg)
    assert code == 0, err


def test_the_stored_config_alone_naming_code_is_refused(cli, run_dir, tmp_path, marker, userpkg):
    # The checkpoint's model_spec is mamlkit's own; its config's ``model`` names code that resume would import.
    bad = hostile_copy(run_dir, tmp_path / "cfg", model=userpkg)
    code, _, err = cli("train", "--resume", bad, "--iterations", "3")
    assert code == 2 and userpkg in err and "Traceback" not in err
    with pytest.raises(UntrustedModelCode):
        mamlkit.load(bad)
    assert markers(marker) == []


def test_an_adapted_model_file_naming_code_is_refused(run_dir, tmp_path, marker, userpkg):
    learner = mamlkit.load(run_dir)
    x = torch.linspace(-1, 1, 5).unsqueeze(1)
    path = tmp_path / "task.safetensors"
    learner.adapt(x, torch.sin(x), steps=1).save(path)
    tensors, state = checkpoint.load(path)
    state["model_spec"] = factory(userpkg, width=40)
    checkpoint.save(path, tensors, state)
    with pytest.raises(UntrustedModelCode, match="adapted model"):
        mamlkit.load(path)
    state["model_spec"] = factory("os:system", command=f"touch {marker}")
    checkpoint.save(path, tensors, state)
    with pytest.raises(mamlkit.models.ModelSpecError, match="os:system"):
        mamlkit.load(path, trust_model_code=True)
    assert markers(marker) == []


def test_a_config_file_naming_code_needs_consent(cli, tmp_path, marker, userpkg):
    yaml = tmp_path / "over.yaml"
    yaml.write_text(f"model: {userpkg}\n")
    code, _, err = cli("train", "sinusoid", "--config", yaml, "--out-dir", tmp_path / "runs", *FAST)
    assert code == 2 and f"--config {yaml}" in err and userpkg in err
    assert markers(marker) == []
    code, _, err = cli("train", "sinusoid", "--config", yaml, "--trust-model-code", "--out-dir", tmp_path / "runs",
                       *FAST)
    assert code == 0, err
    # The run it made resumes with its factory named again on the command line.
    code, _, err = cli("train", "--resume", tmp_path / "runs" / "sinusoid-maml", "--iterations", "3",
                       "--model", userpkg)
    assert code == 0, err


def test_shipped_names_win_over_a_local_folder(run_dir, tmp_path, marker, userpkg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile_copy(run_dir, tmp_path / "omniglot-5w1s", factory(userpkg, width=40), model=userpkg)
    shipped = mamlkit.load("omniglot-5w1s")
    assert shipped.cfg.task == "omniglot"  # the package's asset, not the folder in the current directory
    with pytest.raises(UntrustedModelCode):
        mamlkit.load("./omniglot-5w1s")  # a path reaches the local one, which is then checked
    assert markers(marker) == []


@pytest.mark.parametrize("name", ["os:system", "subprocess:run", "runpy:run_path", "builtins:open", "torch.hub:load",
                                  "torch:load", "torch.jit:load", "torch.utils.cpp_extension:load",
                                  "importlib:import_module", "mamlkit.data:download", "pkg.mod:fn;rm", "pkg mod:fn",
                                  ":fn", "pkg.mod:",
                                  "a" * 300 + ":f", "__main__:f"])
def test_names_that_are_never_factories_are_refused_before_import(name, monkeypatch):
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda *a, **k: imported.append(a))
    with pytest.raises(mamlkit.models.ModelSpecError):
        check_factory_name(name)
    with pytest.raises(mamlkit.models.ModelSpecError):
        approve_model_code([factory(name)], "a file", trust_model_code=True)
    assert imported == []


@pytest.mark.parametrize("name", ["userpkg.nets:make", "torch.nn:Linear", "my_models:Net.from_config"])
def test_ordinary_factory_names_pass_the_check(name):
    assert check_factory_name(name) == name


def test_the_resume_commands_mamlkit_prints_name_the_factory(cli, tmp_path, marker, userpkg):
    argv = ["train", "sinusoid", "--model", userpkg, "--out-dir", tmp_path / "runs", *FAST]
    code, _, err = cli(*argv)
    assert code == 0, err
    code, _, err = cli(*argv)  # the folder holds that run now
    run = tmp_path / "runs" / "sinusoid-maml"
    command = f"mamlkit train --resume {run} --model {userpkg}"
    assert code == 2 and f"Resume it with `{command}`" in err
    code, _, err = cli(*command.split()[1:], "--iterations", "3")
    assert code == 0, err
