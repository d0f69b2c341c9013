"""eval/gpu_check.py on a machine without CUDA: a clear message, exit status 0, no report written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_without_cuda_exits_cleanly_with_a_clear_message():
    report = REPO / "assets" / "gpu_check.txt"
    before = report.read_bytes() if report.exists() else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "gpu_check.py")], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device is visible" in proc.stdout and "python eval/gpu_check.py" in proc.stdout
    assert (report.read_bytes() if report.exists() else None) == before
