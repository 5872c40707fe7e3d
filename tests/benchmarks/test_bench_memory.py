"""benchmarks/bench_memory.py stays runnable: --tiny trains on the CPU and reports time and the estimate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark script runs in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def test_memory_benchmark_tiny(tmp_path):
    """One checkpointing mode and recipe of the tiny hybrid model: a finite loss, a step time, an estimate."""
    out = tmp_path / "memory.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_memory.py"),
            "--tiny",
            "--modes",
            "selective",
            "--recipes",
            "fp8_hybrid",
            "--fsdp",
            "off",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["checkpointing"] == "selective" and row["recipe"] == "fp8_hybrid"
    assert row["step_s"] > 0 and row["estimate_gib"] > 0 and row["loss"] == row["loss"]  # not NaN
    assert row["measured_peak_gib"] is None  # no memory counter on the CPU
