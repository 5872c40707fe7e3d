"""Cross-attention kernels at wan-14b shapes on one GPU: 80,640 video queries against 512 text keys, 40 x 128.

With so few keys each query tile of a flash kernel runs only a handful of key iterations, so the fixed cost
per tile weighs more than in self-attention. This compares PyTorch's SDPA kernels (cuDNN, flash,
memory-efficient, math) for that shape; forward and forward+backward, bf16.

    python benchmarks/bench_cross_attention.py --out cross_attention.json
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import timed, write_report  # noqa: E402

from osp_megatron.attention.dispatch import dot_product_attention  # noqa: E402

KERNELS = ("cudnn", "flash", "efficient", "math")


def attend(kernel, q, k, v):
    return dot_product_attention(q, k, v, backend=kernel)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=80640)
    parser.add_argument("--keys", type=int, default=512)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default="cross_attention.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cross_attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def make(tokens):
        return torch.randn(
            1, tokens, args.heads, args.head_dim, device=device, dtype=torch.bfloat16, generator=generator
        ).requires_grad_(True)

    q, k, v = make(args.queries), make(args.keys), make(args.keys)
    grad = torch.randn_like(q)
    reference = attend("cudnn", q, k, v).detach().float()
    flops = 4 * args.queries * args.keys * args.heads * args.head_dim
    rows = []
    for kernel in args.kernels:
        try:
            out = attend(kernel, q, k, v)
        except RuntimeError as error:  # a kernel PyTorch cannot run for these shapes
            rows.append({"kernel": kernel, "error": str(error).splitlines()[0]})
            continue
        error = float((out.float() - reference).norm() / reference.norm())

        def forward(kernel=kernel):
            with torch.no_grad():
                attend(kernel, q, k, v)

        def step(kernel=kernel):
            torch.autograd.grad(attend(kernel, q, k, v), (q, k, v), grad)

        fwd, both = timed(forward, args.warmup, args.repeat, device), timed(step, args.warmup, args.repeat, device)
        rows.append(
            {
                "kernel": kernel,
                "fwd_ms": fwd,
                "step_ms": both,
                "fwd_tflops": flops / fwd / 1e9,
                "step_tflops": 3.5 * flops / both / 1e9,
                "rel_err_vs_cudnn": error,
            }
        )
        print(rows[-1], flush=True)
    print(f"{'kernel':<10} {'fwd ms':>8} {'fwd+bwd ms':>11} {'vs cudnn':>9}")
    base = next((r["step_ms"] for r in rows if r["kernel"] == "cudnn" and "step_ms" in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<10} unavailable: {r['error']}")
        else:
            print(
                f"{r['kernel']:<10} {r['fwd_ms']:8.2f} {r['step_ms']:11.2f} "
                f"{(base / r['step_ms']) if base else float('nan'):9.2f}"
            )
    write_report(args.out, rows, device, queries=args.queries, keys=args.keys)


if __name__ == "__main__":
    main()
