"""Which 16-bit attention kernels cuDNN has for the wan-14b shapes, and what a preceding GEMM burst costs them.

Two measurements, each for full attention (1 x 80,640 tokens at 768P) and Skiparse P = 2 (4 x 20,160),
40 heads x 128, bf16:

1. Every engine and knob setting cuDNN's graph API offers for the SDPA forward (with softmax statistics,
   as training needs) and backward, each timed, next to PyTorch's own cuDNN SDPA call. Shows whether a
   different kernel configuration than the heuristic's first choice is faster for either shape.
2. The attention forward and forward+backward timed back to back, and again each right after a burst of
   large bf16 GEMMs (the projections that precede attention in a block). The difference is what the
   GPU's clock and power state after GEMMs costs an attention call in a training step.

    python benchmarks/bench_attention_kernels.py --out attention_kernels.json
"""

import argparse
import itertools
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import timed, write_report  # noqa: E402

from osp_megatron.attention.dispatch import dot_product_attention  # noqa: E402
from osp_megatron.quantization.fp8_attention import cudnn_bhsd, load_cudnn_frontend  # noqa: E402

SHAPES = {"full 768P": (1, 80640), "Skiparse 768P": (4, 20160)}


def knob_settings(knobs, limit: int = 256) -> list:
    """Every combination of the knobs' values (min..max by stride), at most ``limit``, as {knob type: value}."""
    ranges = [range(knob.min_value, knob.max_value + 1, max(knob.stride, 1)) for knob in knobs]
    combos = itertools.islice(itertools.product(*ranges), limit)
    return [{knob.type: value for knob, value in zip(knobs, combo)} for combo in combos]


class SdpaGraphs:
    """bf16 SDPA forward/backward graphs of cuDNN's frontend for one [B, S, H, D] shape."""

    def __init__(self, cudnn, handle, q: torch.Tensor):
        self.cudnn, self.handle = cudnn, handle
        self.dims, self.strides = cudnn_bhsd(q)
        b, h, s, _ = self.dims
        self.stats_dims, self.stats_strides = [b, h, s, 1], [h * s, s, 1, 1]

    def _graph(self):
        types = self.cudnn.data_type
        return self.cudnn.pygraph(
            io_data_type=types.BFLOAT16,
            intermediate_data_type=types.FLOAT,
            compute_data_type=types.FLOAT,
            handle=self.handle,
        )

    def _tensors(self, graph, names):
        return {
            name: graph.tensor(name=name, dim=self.dims, stride=self.strides, data_type=self.cudnn.data_type.BFLOAT16)
            for name in names
        }

    def forward(self):
        graph = self._graph()
        tensors = self._tensors(graph, ("q", "k", "v"))
        o, stats = graph.sdpa(
            q=tensors["q"],
            k=tensors["k"],
            v=tensors["v"],
            generate_stats=True,
            attn_scale=1.0 / math.sqrt(self.dims[3]),
        )
        o.set_output(True).set_dim(self.dims).set_stride(self.strides)
        stats.set_output(True).set_data_type(self.cudnn.data_type.FLOAT)
        tensors.update(o=o, stats=stats)
        graph.validate()
        graph.build_operation_graph()
        return graph, tensors

    def backward(self):
        graph = self._graph()
        tensors = self._tensors(graph, ("q", "k", "v", "o", "dO"))
        tensors["stats"] = graph.tensor(
            name="stats", dim=self.stats_dims, stride=self.stats_strides, data_type=self.cudnn.data_type.FLOAT
        )
        grads = graph.sdpa_backward(
            q=tensors["q"],
            k=tensors["k"],
            v=tensors["v"],
            o=tensors["o"],
            dO=tensors["dO"],
            stats=tensors["stats"],
            attn_scale=1.0 / math.sqrt(self.dims[3]),
        )
        for name, grad in zip(("dQ", "dK", "dV"), grads):
            grad.set_output(True).set_dim(self.dims).set_stride(self.strides)
            tensors[name] = grad
        graph.validate()
        graph.build_operation_graph()
        return graph, tensors


def heuristic_engines(cudnn, graph) -> list:
    """Engine ids of cuDNN's heuristic plans for ``graph`` (plan names read "eng<id>_k<knob>=<value>...")."""
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    engines = []
    for index in range(graph.get_execution_plan_count()):
        name = graph.get_plan_name_at_index(index)
        engine = int(name[3:].split("_")[0]) if name.startswith("eng") else None
        if engine is not None and engine not in engines:
            engines.append(engine)
    return engines


def sweep(make, buffers, args, device, label) -> list:
    """Time every engine/knob setting ``make()``'s graph supports; rows sorted fastest first.

    The heuristic's engines go first, so a sweep cut short by --budget-s has covered them.
    """
    rows, best, start = [], float("inf"), time.time()
    graph, _ = make()
    count = graph.get_engine_count()
    heuristic = heuristic_engines(args.cudnn, make()[0])
    print(f"{label}: {count} engines, heuristic order {heuristic}", flush=True)
    for engine in heuristic + [engine for engine in range(count) if engine not in heuristic]:
        try:
            knobs = graph.get_knobs_for_engine(engine)
        except Exception:  # an engine that does not apply to this graph at all
            continue
        for setting in knob_settings(knobs):
            if time.time() - start > args.budget_s:
                print(f"{label}: sweep stopped after {args.budget_s} s", flush=True)
                return sorted(rows, key=lambda row: row["ms"])
            name = f"engine {engine} " + " ".join(f"{str(k).split('.')[-1]}={v}" for k, v in setting.items())
            try:
                candidate, tensors = make()
                candidate.create_execution_plan(engine, setting)
                candidate.check_support()
                candidate.build_plans()
            except Exception:  # cuDNN refuses this setting for the shape
                continue
            workspace = torch.empty(max(candidate.get_workspace_size(), 1), dtype=torch.uint8, device=device)
            pack = {tensors[key]: value for key, value in buffers.items()}

            def run(candidate=candidate, pack=pack, workspace=workspace):
                candidate.execute(pack, workspace, handle=args.handle)

            once = timed(run, 1, 1, device)  # settings over twice the best so far keep their single time
            ms = once if once > 2 * best else timed(run, 0, args.repeat, device)
            best = min(best, ms)
            rows.append({"config": name, "ms": ms})
            print(f"{label}: {name}: {ms:.2f} ms", flush=True)
    return sorted(rows, key=lambda row: row["ms"])


def gemm_burst(device, count: int):
    x = torch.randn(80640, 5120, device=device, dtype=torch.bfloat16)
    w = torch.randn(15360, 5120, device=device, dtype=torch.bfloat16)

    def burst():
        for _ in range(count):
            torch.mm(x, w.t())

    return burst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=45.0, help="time limit of one engine/knob sweep")
    parser.add_argument("--burst", type=int, default=6, help="GEMMs (80,640 x 5120 x 15360) before each call")
    parser.add_argument("--skip", nargs="*", default=[], choices=["engines", "burst"])
    parser.add_argument("--out", default="attention_kernels.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_kernels.py needs a CUDA GPU")
    device = torch.device("cuda")
    cudnn = load_cudnn_frontend()
    args.cudnn, args.handle = cudnn, cudnn.create_handle()
    cudnn.set_stream(args.handle, torch.cuda.current_stream().cuda_stream)
    burst = gemm_burst(device, args.burst)
    rows = []
    for label in args.shapes:
        batch, tokens = SHAPES[label]
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (
            torch.randn(
                batch, tokens, args.heads, args.head_dim, device=device, dtype=torch.bfloat16, generator=generator
            )
            for _ in range(4)
        )
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

        def forward():
            with torch.no_grad():
                dot_product_attention(q, k, v)

        def step():
            torch.autograd.grad(dot_product_attention(*leaves), leaves, grad)

        row = {
            "shape": label,
            "batch": batch,
            "tokens": tokens,
            "torch_fwd_ms": timed(forward, 2, args.repeat, device),
            "torch_fwdbwd_ms": timed(step, 2, args.repeat, device),
        }
        if "burst" not in args.skip:
            row["fwd_after_gemms_ms"] = timed(forward, 1, args.repeat, device, before=burst)
            row["fwdbwd_after_gemms_ms"] = timed(step, 1, args.repeat, device, before=burst)
        if "engines" not in args.skip:
            graphs = SdpaGraphs(cudnn, args.handle, q)
            out = torch.empty_like(q)
            stats = torch.empty(batch, args.heads, tokens, 1, device=device, dtype=torch.float32)
            dq, dk, dv = (torch.empty_like(q) for _ in range(3))
            row["forward_configs"] = sweep(
                graphs.forward, dict(q=q, k=k, v=v, o=out, stats=stats), args, device, f"{label} forward"
            )
            row["backward_configs"] = sweep(
                graphs.backward,
                dict(q=q, k=k, v=v, o=out, dO=grad, stats=stats, dQ=dq, dK=dk, dV=dv),
                args,
                device,
                f"{label} backward",
            )
        rows.append(row)
        torch.cuda.empty_cache()

    print(
        f"\n{'shape':<15} {'fwd ms':>8} {'after GEMMs':>12} {'fwd+bwd ms':>11} {'after GEMMs':>12} "
        f"{'fwd configs':>12} {'best fwd cfg':>13} {'bwd configs':>12} {'best bwd cfg':>13}"
    )
    for row in rows:
        fwd_cfg, bwd_cfg = row.get("forward_configs", []), row.get("backward_configs", [])
        print(
            f"{row['shape']:<15} {row['torch_fwd_ms']:8.2f} {row.get('fwd_after_gemms_ms', float('nan')):12.2f} "
            f"{row['torch_fwdbwd_ms']:11.2f} {row.get('fwdbwd_after_gemms_ms', float('nan')):12.2f} "
            f"{len(fwd_cfg):12d} {fwd_cfg[0]['ms'] if fwd_cfg else float('nan'):13.2f} "
            f"{len(bwd_cfg):12d} {bwd_cfg[0]['ms'] if bwd_cfg else float('nan'):13.2f}"
        )
        for phase in ("forward_configs", "backward_configs"):
            for config in row.get(phase, [])[:3]:
                print(f"    {phase.split('_')[0]:<9} {config['config']:<40} {config['ms']:9.2f} ms")
    write_report(
        args.out,
        rows,
        device,
        heads=args.heads,
        head_dim=args.head_dim,
        gemm_burst=args.burst,
        cudnn_backend=cudnn.backend_version(),
    )


if __name__ == "__main__":
    main()
