"""The GPU benchmark scripts stay runnable: their --tiny CPU mode produces the table's JSON rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script, *args, out):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text())


def test_skiparse_benchmark_tiny(tmp_path):
    """bench_skiparse.py --tiny reports full vs Skiparse attention timings and speed-ups per resolution."""
    report = _run("bench_skiparse.py", "--skip", "model", out=tmp_path / "skiparse.json")
    rows = report["rows"]
    assert {row["resolution"] for row in rows} == {"odd", "even"}
    assert all(row["full_fwdbwd_ms"] > 0 and row["fwdbwd_speedup"] > 0 for row in rows)


def test_fp8_benchmark_tiny(tmp_path):
    """bench_fp8.py --tiny times bf16 and quantized linears (the quantized path is really applied)."""
    report = _run("bench_fp8.py", "--skip", "step", "--skip", "loss", out=tmp_path / "fp8.json")
    (row,) = report["rows"]
    assert row["bf16_ms"] > 0 and row["fp8_hybrid_ms"] > 0 and row["hif8_ms"] > 0


def test_fp8_benchmark_loss_curves_tiny(tmp_path):
    """bench_fp8.py --tiny records a loss curve per recipe, FP8 attention included, next to bf16's."""
    report = _run("bench_fp8.py", "--skip", "linear", "--skip", "step", "--recipes", "fp8_hybrid+attn",
                  "--loss-steps", "3", out=tmp_path / "fp8.json")
    (row,) = report["rows"]
    assert set(row["curves"]) == {"bf16", "fp8_hybrid+attn"} and all(len(c) == 3 for c in row["curves"].values())
    assert row["relative_to_bf16"]["bf16"] == 0.0


@pytest.mark.slow
def test_fsdp_benchmark_tiny(tmp_path):
    """bench_fsdp.py --tiny runs osp-train under torchrun on one and two CPU ranks (FSDP with SSP=2) and reports
    step time, throughput, memory, finite losses and the two-rank speed-up."""
    report = _run("bench_fsdp.py", "--cases", "wan13b_480p_1gpu", "wan13b_480p_fsdp_ssp2", "--warmup", "1",
                  "--work", str(tmp_path / "work"), out=tmp_path / "fsdp.json")
    one, two = report["rows"]
    assert one["gpus"] == 1 and two["gpus"] == 2
    for row in (one, two):
        assert "error" not in row, row.get("error")
        assert row["steps"] == 3 and row["step_s"] > 0 and row["loss_finite"] and row["peak_gib"] > 0
    assert two["speedup"] > 0 and "parallel.fsdp=true" in two["command"]
