import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Keep tests stable and fair on a 2-core CI machine.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


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
