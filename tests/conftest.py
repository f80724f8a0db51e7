import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Real data sets some tests need, found where mamlkit looks by default: $MAMLKIT_DATA, else the default
# data root (where `mamlkit data NAME` puts them). Missing, those tests skip with one reason each, or
# fail when skipping is not allowed: `--require-data`, or MAMLKIT_REQUIRE_DATA=1 (what CI sets).
DATASETS = {"omniglot": ("images_background.zip", "images_evaluation.zip"),
            "clinc150": ("data_full.json", "domains.json")}
REQUIRE_DATA_ENV = "MAMLKIT_REQUIRE_DATA"


def pytest_addoption(parser):
    parser.addoption("--require-data", action="store_true", default=False,
                     help=f"fail, not skip, tests whose real data set is missing (also ${REQUIRE_DATA_ENV}=1)")


def data_required(config) -> bool:
    return config.getoption("--require-data") or os.environ.get(REQUIRE_DATA_ENV, "") not in ("", "0")


def real_data(config, name: str) -> Path:
    """The folder of the real data set ``name``; skips the test (fails it if data is required) when absent."""
    from mamlkit.data import ENV_VAR, dataset_dir

    files = DATASETS[name]
    folder = dataset_dir(name, None, files)
    if all((folder / f).is_file() for f in files):
        return folder
    reason = (f"{name} not found in {folder}: run `mamlkit data {name}` (online), or set {ENV_VAR} "
              f"to the folder that holds {name}/")
    if data_required(config):
        pytest.fail(reason, pytrace=False)
    _MISSING.add(reason)
    pytest.skip(reason)


_MISSING: set[str] = set()


def pytest_terminal_summary(terminalreporter):
    """One line per missing data set, so a plain `pytest -q` says what it did not test and why."""
    counts = dict.fromkeys(sorted(_MISSING), 0)
    for report in terminalreporter.stats.get("skipped", []):
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        for reason in counts:
            counts[reason] += message.endswith(reason)
    for reason, count in counts.items():
        terminalreporter.write_line(f"skipped {count} test(s): {reason}", yellow=True)


@pytest.fixture(scope="session")
def omniglot_dir(request) -> Path:
    """The real Omniglot zips' folder (checksums, split sizes, the paper's numbers need them)."""
    return real_data(request.config, "omniglot")


@pytest.fixture(scope="session")
def clinc_dir(request) -> Path:
    """The real CLINC150 folder."""
    return real_data(request.config, "clinc150")


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
