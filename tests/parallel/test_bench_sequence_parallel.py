"""The sequence-parallel benchmark runs end to end on two gloo ranks with toy sizes (`--tiny`).

It must time all three layouts, count their bytes in the ledger and write the JSON report.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from osp_megatron.engine.ranks import run_on_ranks

pytestmark = pytest.mark.slow  # the benchmark runs on two gloo ranks

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sequence_parallel.py"
# Loaded here, once, so the forked ranks start without importing megatron-core again.
_SPEC = importlib.util.spec_from_file_location("bench_sequence_parallel", SCRIPT)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _run_benchmark(rank, world_size, argv):
    report = bench.main(argv)
    return {"results": report["results"], "deepspeed": report["deepspeed_full_layer"]}


def test_benchmark_tiny_on_two_gloo_ranks(tmp_path):
    """--tiny on 2 ranks: (a), (b), (c) timed, (c) as SSP over both ranks moving fewer bytes than (b), and the
    ratios, ledger bytes and DeepSpeed note (or times) in the JSON written by rank 0."""
    out = tmp_path / "sp.json"
    argv = ["--tiny", "--blocks", "5", "--warmup", "0", "--steps", "1", "--resolutions", "tiny-odd", "--out", str(out)]
    run_on_ranks(_run_benchmark, 2, argv)
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["nccl_nvls_enable"] == "0"
    (row,) = report["results"]
    layouts = row["layouts"]
    assert set(layouts) == {"a_full_ulysses", "b_hybrid_ulysses", "c_hybrid_ssp"}
    assert (layouts["c_hybrid_ssp"]["ssp"], layouts["c_hybrid_ssp"]["ulysses"]) == (2, 1)
    assert all(result["step_ms"] > 0 for result in layouts.values())
    ssp_bytes = layouts["c_hybrid_ssp"]["comm_bytes_per_step"]
    assert ssp_bytes["comm/ssp/all_to_all_bytes"] > 0
    assert ssp_bytes["comm/total_bytes"] < layouts["b_hybrid_ulysses"]["comm_bytes_per_step"]["comm/total_bytes"]
    assert row["ratio_c_over_a"] > 0 and row["ratio_c_over_b"] > 0 and row["comm_ratio_c_over_b"] < 1
    deepspeed = report["deepspeed_full_layer"]["tiny-odd"]
    assert "skipped" in deepspeed or deepspeed["ours_ms"] > 0
