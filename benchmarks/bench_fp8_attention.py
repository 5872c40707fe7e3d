"""FP8 attention (cuDNN, osp_megatron.quantization.fp8_attention) vs the bf16 cuDNN kernel at wan-14b shapes on one GPU.

For each shape: forward and forward+backward times of both, and the FP8 error against the bf16 result
(relative L2 of the output and of dq, dk, dv). Shapes: full attention over 768P (1 x 80,640 tokens) and
the Skiparse P=2 subsequences (4 x 20,160), 40 heads x 128. Prints a table and writes JSON.

    python benchmarks/bench_fp8_attention.py --out fp8_attention.json
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import timed, write_report  # noqa: E402

from osp_megatron.attention.dispatch import dot_product_attention  # noqa: E402
from osp_megatron.quantization.fp8_attention import (  # noqa: E402
    FP8AttentionState,
    _runner,
    fp8_attention_supported,
    fp8_dot_product_attention,
)

SHAPES = {
    "full_768P": (1, 80640),
    "sparse_768P": (4, 20160),
    "sparse_720P_packed": (4, 18900),
    "full_720P_packed": (1, 75600),
}


def relative_error(value, reference):
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


def shape_row(name, batch, tokens, args, device):
    heads, dim = args.heads, args.head_dim
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, tokens, heads, dim, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_(
            True
        )
        for _ in range(3)
    )
    grad = torch.randn(batch, tokens, heads, dim, device=device, dtype=torch.bfloat16, generator=generator)
    flops = 4 * batch * tokens * tokens * heads * dim
    row = {"bench": "attention", "shape": name, "batch": batch, "tokens": tokens, "heads": heads, "head_dim": dim}
    results = {}
    state = FP8AttentionState()  # one layer's gradient scales, kept across calls as in a model
    for label, fn in (
        ("bf16", dot_product_attention),
        ("fp8", lambda a, b, c: fp8_dot_product_attention(a, b, c, args.gradient_format, state)),
    ):
        out = fn(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        results[label] = [t.detach() for t in (out, dq, dk, dv)]

        def forward(fn=fn):
            with torch.no_grad():
                fn(q, k, v)

        def step(fn=fn):
            torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

        row[f"{label}_fwd_ms"] = timed(forward, args.warmup, args.repeat, device)
        row[f"{label}_step_ms"] = timed(step, args.warmup, args.repeat, device)
        row[f"{label}_fwd_tflops"] = flops / row[f"{label}_fwd_ms"] / 1e9
        row[f"{label}_step_tflops"] = 3.5 * flops / row[f"{label}_step_ms"] / 1e9
    row["gradient_scale_reruns"] = state.reruns
    row["fwd_speedup"] = row["bf16_fwd_ms"] / row["fp8_fwd_ms"]
    row["step_speedup"] = row["bf16_step_ms"] / row["fp8_step_ms"]
    for index, tensor in enumerate(("out", "dq", "dk", "dv")):
        row[f"{tensor}_rel_err"] = relative_error(results["fp8"][index], results["bf16"][index])
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--gradient-format", default="hybrid", choices=["hybrid"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="fp8_attention.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_attention.py needs a CUDA GPU (cuDNN FP8 attention runs on SM90+)")
    device = torch.device("cuda")
    if not fp8_attention_supported(torch.empty(1, device=device, dtype=torch.bfloat16)):
        raise SystemExit("FP8 attention cannot run here: it needs an SM90+ GPU and nvidia-cudnn-frontend")
    rows = []
    for name in args.shapes:
        rows.append(shape_row(name, *SHAPES[name], args, device))
        print(rows[-1], flush=True)
    runner = _runner(device)
    plans = {
        str(key): ("built" if plan is not None else runner.failures.get(key, "failed"))
        for key, plan in runner.plans.items()
    }
    print(
        f"{'shape':<20} {'bf16 fwd':>9} {'fp8 fwd':>9} {'x':>6} {'bf16 f+b':>9} {'fp8 f+b':>9} {'x':>6} "
        f"{'err o':>7} {'err dq':>7} {'err dk':>7} {'err dv':>7}"
    )
    for r in rows:
        print(
            f"{r['shape']:<20} {r['bf16_fwd_ms']:9.1f} {r['fp8_fwd_ms']:9.1f} {r['fwd_speedup']:6.2f} "
            f"{r['bf16_step_ms']:9.1f} {r['fp8_step_ms']:9.1f} {r['step_speedup']:6.2f} {r['out_rel_err']:7.4f} "
            f"{r['dq_rel_err']:7.4f} {r['dk_rel_err']:7.4f} {r['dv_rel_err']:7.4f}"
        )
    for key, state in plans.items():
        print(f"plan {key}: {state}")
    write_report(args.out, rows, device, plans=plans, gradient_format=args.gradient_format)


if __name__ == "__main__":
    main()
