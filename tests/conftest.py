import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fixed_threads():
    # One thread: the tests are small, and more threads oversubscribe a 2-core CI machine.
    from mamlkit.exec import threads

    torch.set_num_threads(1)
    threads.reset()  # a trainer run earlier in this process chose its own
    yield


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """One preprocessed-data cache for the whole session, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("mamlkit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMLKIT_CACHE", str(path))
        yield path


@pytest.fixture
def kernels_on(monkeypatch):
    """mamlkit.exec.kernels on, for tensors of any size (the tests' are small), and no remembered decisions."""
    from mamlkit.exec import kernels

    kernels.set_enabled(True)
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernels, "_USEFUL", {})
    yield
    kernels.set_enabled(True)


@pytest.fixture
def cli(tmp_path, capsys):
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    from mamlkit.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


sys.path.insert(0, str(ROOT))
