import gc
import os
import subprocess
import sys

import pytest

from launch.superlink import SOURCE_ROOT as PROJECT_ROOT

# flwr-datasets / datasets must never wait on the hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# modules whose every test runs real Flower, processes or containers
SLOW_MODULES = {"test_simulation", "test_datasets_e2e", "test_deploy", "test_lifecycle"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES or "flain_cli" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.process)


@pytest.fixture(autouse=True, scope="module")
def frozen_heap():
    """Flower's ArrayRecord calls gc.collect() on every conversion (six per Bulyan round); with
    torch and Flower imported each call walks ~10^6 objects. What exists when a module starts is
    frozen (skipped by the collector) and thawed after it: 0.8 s a round -> milliseconds."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def flain_cli():
    """Run `flain ...` as a user would (a fresh process); returns the CompletedProcess."""

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=timeout)

    return run
