import os
import subprocess
import sys

import pytest

from launch.superlink import SOURCE_ROOT as PROJECT_ROOT

# flwr-datasets / datasets must never wait on the hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def flain_cli():
    """Run `flain ...` as a user would (a fresh process); returns the CompletedProcess."""

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=timeout)

    return run
