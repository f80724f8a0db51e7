"""The README's examples run: its Python blocks, its CLI calls, and its test command is CI's."""

import re
import shlex
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()
FAST = ["--eval-tasks", "20", "--val-tasks", "5", "--no-progress", "--no-tensorboard"]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [b.strip() for b in blocks("bash")]
    assert len(commands) == 2, "the quickstart gives exactly two commands"
    assert commands[1] in ci.splitlines(), "README's test command must be the line .ci/run runs"
    assert "mamlkit train sinusoid" in commands[0] and "torch==2.13.0" in commands[0]


def test_ci_runs_every_real_data_test_and_the_readme_says_how():
    """CI points MAMLKIT_DATA at the data beside the clone and turns missing-data skips into failures;
    the README tells a contributor how to get the same."""
    from conftest import REQUIRE_DATA_ENV

    ci = (ROOT / ".ci" / "run").read_text()
    exports = [line for line in ci.splitlines() if line.startswith("export ")]
    assert any('MAMLKIT_DATA="$PWD/../shared/data"' in e and f"{REQUIRE_DATA_ENV}=1" in e for e in exports), exports
    assert ci.index("export MAMLKIT_DATA") < ci.index("pytest -q")
    for words in ("mamlkit data omniglot", "mamlkit data clinc150", "MAMLKIT_DATA=DIR", "--require-data",
                  REQUIRE_DATA_ENV):
        assert words in README, words


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), {})
    mse = float(re.search(r"query MSE after adaptation: ([\d.]+)", capsys.readouterr().out).group(1))
    assert mse < 10.0  # finite and sane after 200 meta-iterations


def test_readme_cli_examples_run(cli, tmp_path, monkeypatch):
    for code in blocks("python"):
        if code.startswith("# mynets.py"):  # "Bring your own model": a module in the folder the commands run in
            (tmp_path / "mynets.py").write_text(code)
    monkeypatch.chdir(tmp_path)  # found there with no PYTHONPATH, as from a shell
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # `python -m pytest` adds ''
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    lines = [line[2:] for b in blocks("console") for line in b.splitlines() if line.startswith("$ mamlkit ")]
    assert len(lines) >= 4
    for line in lines:
        args = shlex.split(line.replace("runs/", f"{tmp_path}/"))[1:]
        if args[0] == "train" and "--resume" in args:
            args += ["--iterations", "40", "--no-progress"]
        elif args[0] == "train":
            args += ["--iterations", "20", "--out-dir", str(tmp_path), "--log-every", "10", "--val-every", "10",
                     *FAST]
        elif args[0] == "eval":
            args += ["--eval-tasks", "20"]
        code, out, err = cli(*args)
        assert code == 0, f"`{line}` failed: {err}"


def test_readme_lists_every_preset():
    from mamlkit.presets import PRESETS

    for name in PRESETS:
        assert f"| `{name}` |" in README, f"preset {name} missing from the README's table"


def test_readme_benchmark_example_runs_and_its_implementations_agree():
    import subprocess
    import sys

    lines = [line[2:] for b in blocks("console") for line in b.splitlines()
             if line.startswith("$ python benchmarks/throughput.py ")]
    assert len(lines) == 1
    args = shlex.split(lines[0])[1:] + ["--iters", "3", "--warmup", "1"]  # the last --iters wins
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [r.split("|")[1:-1] for r in proc.stdout.splitlines() if r.startswith(("| mamlkit", "| torch"))]
    names = [r[0].strip().split(" ")[0] for r in rows]
    assert names == ["mamlkit-vmap", "mamlkit-loop", "mamlkit-threads", "torch.func"], proc.stdout
    for r in rows:
        assert float(r[2]) > 0  # tasks/s
        assert float(r[-1]) < 1e-10, f"{r[0]} computes another meta-gradient than mamlkit: {proc.stdout}"
