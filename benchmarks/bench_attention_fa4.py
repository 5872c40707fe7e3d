"""cuDNN fused attention against flash-attn-4 at the wan-14b attention shapes on one GPU, and what auto chooses.

For each shape (wan-14b's 40 heads x 128, bf16) it times the forward and the forward+backward of PyTorch's cuDNN
SDPA (dot_product_attention backend "cudnn": sdpa_kernel(SDPBackend.CUDNN_ATTENTION)) and of flash-attn-4
(backend "flash_attn_4"), each with the peak memory allocated while it ran (inputs included), then the relative L2
error of flash-attn-4's out, dq, dk and dv against cuDNN's, then the choice of backend "auto" on this GPU and its
probe's own times (osp_megatron.attention.kernel_choice). Every kernel and shape runs in its own try: an error is
recorded in the row and the run goes on; the JSON is rewritten after every measurement, so a run cut short keeps
what it measured. Times are medians of --repeat calls after --warmup untimed ones (flash-attn-4 compiles its
kernels in its first call).

Shapes: 768P (21 x 48 x 80 latent tokens) full attention 1 x 80,640 and Skiparse (P = 2) 4 x 20,160; 720P
(21 x 45 x 80) full 1 x 75,600 and packed Skiparse 4 x 18,900, plus the two calls the packed layout really makes
at 720P (subsequences of 19,320 and 18,480 tokens, two of each; docs/skiparse.md).

FLOPs, as in bench_skiparse.py: forward = 4 * batch * heads * Lq * Lk * head_dim (two matrix products);
forward+backward = 3.5 x forward (the backward's five products, the scores recomputed, count 2.5 x forward). Model
TFLOP/s are these FLOPs over the time. docs/performance.md counts a whole model's forward+backward as 3 x forward
(no recomputation), but its attention-op rows use 3.5 x, as here.

    python benchmarks/bench_attention_fa4.py --out attention_fa4.json     (about 2 min on one H100)

`--tiny` runs the same code with toy sizes (on the CPU every GPU kernel records its error).
"""

import argparse
import importlib.metadata
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import timed, write_report  # noqa: E402

from osp_megatron.attention import kernel_choice  # noqa: E402
from osp_megatron.attention.dispatch import dot_product_attention  # noqa: E402
from osp_megatron.attention.kernel_choice import FORWARD, FORWARD_BACKWARD, KernelKey  # noqa: E402

SHAPES = {
    "768P full": (1, 80640),
    "768P Skiparse": (4, 20160),
    "720P full": (1, 75600),
    "720P packed Skiparse": (4, 18900),
    "720P packed Skiparse, 19,320-token calls": (2, 19320),
    "720P packed Skiparse, 18,480-token calls": (2, 18480),
}
TINY_SHAPES = {"tiny full": (1, 256), "tiny Skiparse": (4, 64)}
KERNELS = ("cudnn", "flash_attn_4")
DIRECTIONS = {"fwd": FORWARD, "fwdbwd": FORWARD_BACKWARD}
FORWARD_BACKWARD_FLOPS = 3.5  # x forward FLOPs
GIB = 2**30


def measure(fn, args, device):
    """(median ms, peak GiB allocated during warm-up and timing; None off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    ms = timed(fn, args.warmup, args.repeat, device)
    return ms, torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def relative_l2(value, reference) -> float:
    value, reference = value.float(), reference.float()
    return float((value - reference).norm() / reference.norm())


def output_and_gradients(backend, q, k, v, grad_out):
    out = dot_product_attention(q, k, v, backend=backend)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))


def error_text(error) -> str:
    return f"{type(error).__name__}: {str(error)[:500]}"


def time_kernels(row, label, q, k, v, grad_out, flops, args, device, report):
    """Forward and forward+backward of each kernel, with peak memory; an error is recorded and the next goes on."""
    for backend in KERNELS:
        for short, direction in DIRECTIONS.items():
            if direction == FORWARD:

                def run(backend=backend):
                    with torch.no_grad():
                        dot_product_attention(q, k, v, backend=backend)

            else:

                def run(backend=backend):
                    torch.autograd.grad(dot_product_attention(q, k, v, backend=backend), (q, k, v), grad_out)

            name = f"{backend}_{short}"
            try:
                ms, peak = measure(run, args, device)
            except Exception as error:
                row[f"{name}_error"] = error_text(error)
                print(f"{label}: {backend} {direction}: {row[f'{name}_error']}", flush=True)
                free_memory(device)
                report()
                continue
            tflops = (FORWARD_BACKWARD_FLOPS if direction == FORWARD_BACKWARD else 1) * flops / ms / 1e9
            row.update({f"{name}_ms": ms, f"{name}_tflops": tflops, f"{name}_peak_gib": peak})
            peak_text = "" if peak is None else f", peak {peak:.2f} GiB"
            print(f"{label}: {backend} {direction}: {ms:.2f} ms ({tflops:.0f} TFLOP/s{peak_text})", flush=True)
            report()


def compare_outputs(row, label, q, k, v, grad_out, device, report):
    """Relative L2 error of flash-attn-4's out, dq, dk and dv against cuDNN's."""
    try:
        reference = output_and_gradients("cudnn", q, k, v, grad_out)
        candidate = output_and_gradients("flash_attn_4", q, k, v, grad_out)
        row["flash_attn_4_rel_l2"] = {
            name: relative_l2(value, expected)
            for name, value, expected in zip(("out", "dq", "dk", "dv"), candidate, reference)
        }
        errors = ", ".join(f"{name} {value:.2e}" for name, value in row["flash_attn_4_rel_l2"].items())
        print(f"{label}: flash_attn_4 against cudnn, relative L2: {errors}", flush=True)
    except Exception as error:
        row["flash_attn_4_rel_l2_error"] = error_text(error)
        print(f"{label}: comparison: {row['flash_attn_4_rel_l2_error']}", flush=True)
    reference = candidate = None
    free_memory(device)
    report()


def auto_choice(row, label, q, k, v, grad_out, report):
    """Backend auto on one forward-only and one recorded call, and the decisions its probe made for them."""
    try:
        with torch.no_grad():
            dot_product_attention(q, k, v)
        torch.autograd.grad(dot_product_attention(q, k, v), (q, k, v), grad_out)
    except Exception as error:
        row["auto_error"] = error_text(error)
    decisions = kernel_choice.kernel_decisions()
    batch, tokens, heads, head_dim = q.shape
    for short, direction in DIRECTIONS.items():
        decision = decisions.get(KernelKey(batch, tokens, tokens, heads, head_dim, q.dtype, direction))
        if decision is None:  # CPU, pre-Hopper GPU, probe off, under the threshold or no flash-attn-4: cuDNN
            row[f"auto_{short}"] = {"kernel": "cudnn", "probed": False}
        else:
            row[f"auto_{short}"] = {
                "kernel": decision.kernel,
                "probed": True,
                "probe_ms": decision.times_ms,
                "probe_failures": decision.failures,
            }
        print(f"{label}: auto {direction}: {row[f'auto_{short}']}", flush=True)
    report()


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_table(rows):
    print(
        f"\n{'shape':<42} {'cuDNN fwd':>10} {'FA4 fwd':>10} {'cuDNN f+b':>10} {'FA4 f+b':>10} "
        f"{'auto fwd':>13} {'auto f+b':>13} {'max rel L2':>11}"
    )
    for row in rows:

        def cell(name):
            ms = row.get(f"{name}_ms")
            return f"{'error' if ms is None else f'{ms:.2f}':>10}"

        errors = row.get("flash_attn_4_rel_l2")
        print(
            f"{row['shape']:<42} {cell('cudnn_fwd')} {cell('flash_attn_4_fwd')} {cell('cudnn_fwdbwd')} "
            f"{cell('flash_attn_4_fwdbwd')} {row.get('auto_fwd', {}).get('kernel', '-'):>13} "
            f"{row.get('auto_fwdbwd', {}).get('kernel', '-'):>13} "
            f"{'-' if errors is None else f'{max(errors.values()):.2e}':>11}"
        )
    print("times in ms; model TFLOP/s and peak memory are in the JSON")


def flash_attn_4_version():
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on whatever device is here (for tests)")
    parser.add_argument("--heads", type=int, default=40, help="attention heads (wan-14b: 40)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (wan-14b: 128)")
    parser.add_argument("--shapes", nargs="+", help=f"shapes to run (default all): {', '.join(SHAPES)}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls; the median counts")
    parser.add_argument("--skip", choices=["compare", "auto"], action="append", default=[], help="skip a part")
    parser.add_argument("--out", default="attention_fa4.json", help="JSON report, rewritten after each measurement")
    args = parser.parse_args(argv)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    unknown = set(args.shapes or ()) - set(shapes)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(shapes)}")
    if args.tiny:
        args.heads, args.head_dim = 2, 64
    elif not torch.cuda.is_available():
        raise SystemExit("bench_attention_fa4.py needs a CUDA GPU (or --tiny)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The probe's decision lines, and nothing else at INFO.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger(kernel_choice.__name__).setLevel(logging.INFO)
    kernel_choice.reset_kernel_decisions()
    rows = []

    def report():
        write_report(
            args.out,
            rows,
            device,
            heads=args.heads,
            head_dim=args.head_dim,
            dtype="bfloat16",
            warmup=args.warmup,
            repeat=args.repeat,
            flash_attn_4=flash_attn_4_version(),
            flop_convention="forward = 4 * batch * heads * Lq * Lk * head_dim; forward+backward = 3.5 x forward",
            probe={
                "enabled": kernel_choice.PROBE_ENABLED,
                "min_forward_flops": kernel_choice.MIN_PROBE_FLOPS,
                "repeats": kernel_choice.PROBE_REPEATS,
            },
        )

    for label in args.shapes or shapes:
        batch, tokens = shapes[label]
        flops = 4 * batch * args.heads * tokens * tokens * args.head_dim
        row = {"shape": label, "batch": batch, "tokens": tokens, "forward_tflop": flops / 1e12}
        rows.append(row)
        try:
            generator = torch.Generator(device=device).manual_seed(0)
            q, k, v, grad_out = (
                torch.randn(
                    batch, tokens, args.heads, args.head_dim, generator=generator, device=device, dtype=torch.bfloat16
                )
                for _ in range(4)
            )
            q, k, v = (tensor.requires_grad_() for tensor in (q, k, v))
            if device.type == "cuda":
                row["inputs_gib"] = torch.cuda.memory_allocated(device) / GIB
            time_kernels(row, label, q, k, v, grad_out, flops, args, device, report)
            if "compare" not in args.skip:
                compare_outputs(row, label, q, k, v, grad_out, device, report)
            if "auto" not in args.skip:
                auto_choice(row, label, q, k, v, grad_out, report)
        except Exception as error:
            row["error"] = error_text(error)
            print(f"{label}: {row['error']}", flush=True)
            report()
        q = k = v = grad_out = None
        free_memory(device)
    report()
    print_table(rows)


if __name__ == "__main__":
    main()
