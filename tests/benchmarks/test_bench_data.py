"""The data benchmarks stay runnable: their --tiny CPU mode writes the JSON rows the docs' tables come from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts run in subprocesses

ROOT = Path(__file__).resolve().parents[2]


def _run(script, out):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text())["rows"]


def test_encode_benchmark_tiny(tmp_path):
    """bench_data_encode.py --tiny times decode, VAE, text encoder and the whole encode per batch size."""
    rows = _run("bench_data_encode.py", tmp_path / "encode.json")
    assert [row["batch_size"] for row in rows] == [1, 2]
    assert all(row["vae_ms"] > 0 and row["clips_per_s"] > 0 and row["vae_peak_gib"] > 0 for row in rows)


def test_loader_benchmark_tiny(tmp_path):
    """bench_data_loader.py --tiny reports samples/s and MB/s with and without a worker process."""
    rows = _run("bench_data_loader.py", tmp_path / "loader.json")
    assert [row["num_workers"] for row in rows] == [0, 1]
    assert all(row["samples_per_s"] > 0 and row["mb_per_s"] > 0 and row["bad_samples"] == 0 for row in rows)
