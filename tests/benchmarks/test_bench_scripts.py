"""The GPU benchmark scripts stay runnable: their --tiny CPU mode produces the table's JSON rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every benchmark script runs in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def _run(script, *args, out):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
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
    report = _run(
        "bench_fp8.py",
        "--skip",
        "linear",
        "--skip",
        "step",
        "--recipes",
        "fp8_hybrid+attn",
        "--loss-steps",
        "3",
        out=tmp_path / "fp8.json",
    )
    (row,) = report["rows"]
    assert set(row["curves"]) == {"bf16", "fp8_hybrid+attn"} and all(len(c) == 3 for c in row["curves"].values())
    assert row["relative_to_bf16"]["bf16"] == 0.0


def test_fsdp_benchmark_tiny(tmp_path):
    """bench_fsdp.py --tiny runs osp-train under torchrun (two CPU ranks, FSDP with SSP=2) and reports step
    time, throughput, memory and finite losses."""
    report = _run(
        "bench_fsdp.py",
        "--cases",
        "wan13b_480p_fsdp_ssp2",
        "--warmup",
        "1",
        "--work",
        str(tmp_path / "work"),
        out=tmp_path / "fsdp.json",
    )
    (row,) = report["rows"]
    assert "error" not in row, row.get("error")
    assert row["gpus"] == 2 and "parallel.fsdp=true" in row["command"] and "parallel.ssp=2" in row["command"]
    assert row["steps"] == 3 and row["step_s"] > 0 and row["samples_per_s"] > 0 and row["loss_finite"]
    assert row["peak_gib"] > 0


def test_grpo_benchmark_tiny(tmp_path):
    """bench_grpo.py --tiny times the sliding-window, flash and all-SDE iterations with peak memory."""
    report = _run("bench_grpo.py", out=tmp_path / "grpo.json")
    modes = {row["mode"]: row for row in report["rows"]}
    assert set(modes) == {"mixed (sliding window)", "mixed + flash", "all steps SDE"}
    assert modes["mixed + flash"]["nfe_per_sample"] < modes["mixed (sliding window)"]["nfe_per_sample"]
    assert modes["all steps SDE"]["sde_steps"] == 4
    assert all(row["iteration_s"] > 0 and row["peak_mem_gb"] > 0 for row in modes.values())


def test_sampling_benchmark_tiny_on_one_and_two_ranks(tmp_path):
    """bench_sampling.py --tiny: seconds per video, full vs hybrid, on one process; then SSP = 2 and CFG-parallel
    on two gloo ranks, with speed-ups over the one-process JSON and its VAE time reused."""
    one = _run("bench_sampling.py", out=tmp_path / "one.json")
    rows = one["rows"]
    assert {(r["attention"], r["layout"]) for r in rows} == {("full", "1gpu"), ("hybrid", "1gpu")}
    assert all(r["video_s"] == pytest.approx(50 * r["step_s"] + r["vae_s"]) and "step_peak_gib" in r for r in rows)
    assert next(r for r in rows if r["attention"] == "hybrid")["speedup_vs_full"] > 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "benchmarks" / "bench_sampling.py"),
        "--tiny",
        "--attention",
        "hybrid",
        "--compare",
        str(tmp_path / "one.json"),
        "--out",
        str(tmp_path / "two.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())["rows"]
    assert {r["layout"] for r in two} == {"sp2", "cfg2"} and all(r["speedup_vs_1gpu"] > 0 for r in two)
