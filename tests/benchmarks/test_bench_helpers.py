"""Benchmark helpers that decide what is measured: the shortened hybrid layout, the GPU idle-gap report and
the cuDNN engine/knob sweep."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_attention_kernels import heuristic_engines, knob_settings  # noqa: E402
from common import hybrid_layout, timed  # noqa: E402
from trace_gaps import analyse  # noqa: E402


@pytest.mark.parametrize("blocks", [5, 10, 15, 20, 40])
def test_hybrid_layout_keeps_one_full_block_in_five(blocks):
    kinds = hybrid_layout(blocks)
    assert len(kinds) == blocks and kinds.count("full") * 5 == blocks
    sparse = [kind for kind in kinds if kind != "full"]
    assert all(a != b for a, b in zip(sparse, sparse[1:]))  # token and group alternate
    if blocks % 10 == 0:  # dual end, like OSP-Next's 4 + 4 of 40
        ends = blocks // 10
        assert kinds[:ends] == ["full"] * ends and kinds[-ends:] == ["full"] * ends


def test_hybrid_layout_of_forty_blocks_is_osp_next_dual_end():
    kinds = hybrid_layout(40)
    assert kinds[:4] == kinds[-4:] == ["full"] * 4 and "full" not in kinds[4:36]


@pytest.mark.parametrize("blocks", [1, 4, 12])
def test_hybrid_layout_refuses_block_counts_without_the_ratio(blocks):
    with pytest.raises(SystemExit, match="multiple of 5"):
        hybrid_layout(blocks)


def _event(cat, name, ts, dur, correlation=None):
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}


def test_trace_gaps_finds_idle_time_and_what_the_host_did(tmp_path):
    events = [
        _event("kernel", "gemm", 0, 1000, 1),
        _event("kernel", "softmax", 1100, 100, 2),  # 0.1 ms gap: below the threshold
        _event("kernel", "attention", 5200, 800, 3),  # 4 ms gap, launched late
        _event("cuda_runtime", "cudaLaunchKernel", 5100, 10, 3),
        _event("cuda_runtime", "cudaStreamSynchronize", 1250, 3000),
        _event("cpu_op", "aten::item", 1200, 3500),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    report = analyse(str(path))
    assert "GPU span       6.0 ms | busy       1.9 ms | idle      4.1 ms" in report
    assert "gaps >= 0.2 ms: 1, together 4.0 ms" in report
    assert "after 'softmax' before 'attention' launched by cudaLaunchKernel at +3.90 ms" in report
    assert "host inside: aten::item" in report
    assert "cudaStreamSynchronize" in report and "3.00 ms" in report


def test_trace_gaps_without_gpu_events(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": [_event("cpu_op", "aten::mm", 0, 10)]}))
    assert "no GPU activity" in analyse(str(path))


class _Knob:
    def __init__(self, type, min_value, max_value, stride):
        self.type, self.min_value, self.max_value, self.stride = type, min_value, max_value, stride


def test_knob_settings_cover_every_combination_by_stride():
    settings = knob_settings([_Knob("STAGES", 0, 2, 1), _Knob("KERNEL_CFG", 0, 36, 12)])
    assert len(settings) == 3 * 4
    assert {"STAGES": 2, "KERNEL_CFG": 36} in settings and {"STAGES": 0, "KERNEL_CFG": 12} in settings
    assert knob_settings([_Knob("KERNEL_CFG", 0, 36, 1)], limit=5) == [{"KERNEL_CFG": v} for v in range(5)]
    assert knob_settings([]) == [{}]  # an engine without knobs is one setting


def test_heuristic_engines_read_plan_names_in_order_without_repeats():
    class Graph:
        names = ["eng6_k24=26", "eng7_k24=26", "eng6_k24=26", "eng2"]

        def create_execution_plans(self, modes):
            self.modes = modes

        def get_execution_plan_count(self):
            return len(self.names)

        def get_plan_name_at_index(self, index):
            return self.names[index]

    class Cudnn:
        class heur_mode:
            A, FALLBACK = "A", "FALLBACK"

    graph = Graph()
    assert heuristic_engines(Cudnn, graph) == [6, 7, 2]
    assert graph.modes == ["A", "FALLBACK"]


def test_timed_runs_before_ahead_of_every_timed_call_only():
    import torch

    calls = []
    timed(lambda: calls.append("fn"), 2, 3, torch.device("cpu"), before=lambda: calls.append("before"))
    assert calls == ["fn", "fn"] + ["before", "fn"] * 3
