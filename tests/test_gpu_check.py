"""benchmarks/gpu_check.py where no GPU is lent: one clear line, exit code 3, nothing written."""

import subprocess
import sys

import pytest
import torch

from launch.superlink import SOURCE_ROOT


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would measure (run it by hand)")
def test_gpu_check_says_no_gpu_and_measures_nothing(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, str(SOURCE_ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no GPU: torch.cuda.is_available() is False (no CUDA device or driver visible); nothing measured"]
    assert proc.stdout == "" and not out.exists()
