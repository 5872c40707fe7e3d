"""Skiparse-2D vs full attention on one GPU: the attention op, single DiT blocks, and a hybrid training step.

Prints a table and writes JSON. Example (one H200): python benchmarks/bench_skiparse.py --out skiparse.json
`--tiny` runs the same code on CPU with toy sizes (used by the test suite).
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import hybrid_layout, random_model, timed, write_report  # noqa: E402

from osp_megatron.utils.logging import quiet_third_party_warnings

quiet_third_party_warnings()

from osp_megatron.attention.dispatch import dot_product_attention  # noqa: E402
from osp_megatron.attention.skiparse import (  # noqa: E402
    from_sparse_layout,
    real_key_runs,
    skiparse_attention_sparse_layout,
    sparse_key_mask,
    to_sparse_layout,
)
from osp_megatron.config.loader import from_dict  # noqa: E402
from osp_megatron.models.config import ModelConfig  # noqa: E402
from osp_megatron.models.flops import forward_flops  # noqa: E402
from osp_megatron.parallel.state import ensure_single_rank_group  # noqa: E402

RESOLUTIONS = {"720P": (21, 45, 80), "768P": (21, 48, 80)}
TINY_RESOLUTIONS = {"odd": (2, 5, 6), "even": (2, 8, 8)}


def attention_op_rows(args, device, dtype, resolutions):
    """Full attention vs Skiparse (P=2) on q, k, v [1, N, heads, head_dim]; forward and forward+backward."""
    rows = []
    heads, head_dim, ratio = args.heads, args.head_dim, 2
    for name, grid in resolutions.items():
        tokens = math.prod(grid)
        q, k, v = (
            torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        grad = torch.randn_like(q)
        mask = sparse_key_mask(grid, ratio, "token", "cpu")
        runs = (
            None
            if bool(mask.all())
            else [(a, b, None if i is None else i.to(device)) for a, b, i in real_key_runs(mask)]
        )
        qs, ks, vs = (to_sparse_layout(t.detach(), grid, ratio, "token").requires_grad_(True) for t in (q, k, v))
        grad_s = torch.randn_like(qs)

        def full_fwd():
            with torch.no_grad():
                dot_product_attention(q, k, v, backend=args.attention_backend)

        def full_step():
            out = dot_product_attention(q, k, v, backend=args.attention_backend)
            out.backward(grad)

        def sparse_fwd():
            with torch.no_grad():
                skiparse_attention_sparse_layout(qs, ks, vs, key_runs=runs, backend=args.attention_backend)

        def sparse_step():
            out = skiparse_attention_sparse_layout(qs, ks, vs, key_runs=runs, backend=args.attention_backend)
            out.backward(grad_s)

        def sparse_step_with_layout():
            qq, kk, vv = (to_sparse_layout(t, grid, ratio, "token") for t in (q, k, v))
            out = skiparse_attention_sparse_layout(qq, kk, vv, key_runs=runs, backend=args.attention_backend)
            from_sparse_layout(out, grid, ratio, "token").backward(grad)

        flops_fwd = 4 * tokens * tokens * heads * head_dim
        measured = {
            "full_fwd_ms": timed(full_fwd, args.warmup, args.repeat, device),
            "skiparse_fwd_ms": timed(sparse_fwd, args.warmup, args.repeat, device),
            "full_fwdbwd_ms": timed(full_step, args.warmup, args.repeat, device),
            "skiparse_fwdbwd_ms": timed(sparse_step, args.warmup, args.repeat, device),
            "skiparse_fwdbwd_with_layout_ms": timed(sparse_step_with_layout, args.warmup, args.repeat, device),
        }
        measured["full_fwd_tflops"] = flops_fwd / measured["full_fwd_ms"] / 1e9
        measured["full_fwdbwd_tflops"] = 3.5 * flops_fwd / measured["full_fwdbwd_ms"] / 1e9
        rows.append(
            {
                "bench": "attention_op",
                "resolution": name,
                "grid": grid,
                "tokens": tokens,
                **measured,
                "fwd_speedup": measured["full_fwd_ms"] / measured["skiparse_fwd_ms"],
                "fwdbwd_speedup": measured["full_fwdbwd_ms"] / measured["skiparse_fwdbwd_ms"],
                "fwdbwd_speedup_with_layout": measured["full_fwdbwd_ms"] / measured["skiparse_fwdbwd_with_layout_ms"],
            }
        )
    return rows


def build_dit(args, device, dtype, sparse: bool, num_layers: int, full_blocks: int = 0, layout=None):
    """Random-weight DiT of wan-14b width; `layout` (per-block kinds) overrides full_blocks."""
    fields = {
        "preset": "tiny" if args.tiny else "wan-14b",
        "num_layers": num_layers,
        "full_blocks": full_blocks,
        "sparse_ratio": 2 if sparse else 1,
        "activation_checkpointing": args.checkpointing,
        "attention_backend": args.attention_backend,
    }
    if layout is not None:
        fields["block_layout"] = list(layout)
    if not args.tiny:
        fields.update(dim=args.heads * args.head_dim, num_heads=args.heads)
    config = from_dict(ModelConfig, fields, "model")
    return random_model(config, device, dtype), config


def model_rows(args, device, dtype, resolutions):
    """Single blocks (full, sparse) and a hybrid multi-block training step vs its full-attention twin."""
    rows = []
    latent_channels = 16
    for name, grid in resolutions.items():
        latent = (grid[0], grid[1] * 2, grid[2] * 2)
        x = torch.randn(1, latent_channels, *latent, device=device, dtype=dtype)
        timestep = torch.tensor([500.0], device=device)
        text_len = 8 if args.tiny else 512
        text = torch.randn(1, text_len, 32 if args.tiny else 4096, device=device, dtype=dtype)
        measured = {}
        for label, sparse, layers, layout in (
            ("full_block", False, 1, None),
            ("sparse_block", True, 1, ["token"]),
            ("full_model", False, args.blocks, None),
            ("hybrid_model", True, args.blocks, hybrid_layout(args.blocks)),
        ):
            model, config = build_dit(args, device, dtype, sparse, layers, layout=layout)

            def step():
                out = model(x, timestep, text)
                out.float().square().mean().backward()

            try:
                ms = timed(step, args.warmup, args.repeat, device)
            except torch.OutOfMemoryError:
                ms = float("nan")
            flops = 3 * forward_flops(config, grid, text_len)
            measured[f"{label}_ms"] = ms
            measured[f"{label}_model_tflops"] = flops / ms / 1e9
            if label.endswith("model"):
                measured[f"{label}_layout"] = model.block_kinds
            if device.type == "cuda":
                measured[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            model = None  # free the weights before the next case
            if device.type == "cuda":
                torch.cuda.empty_cache()
        full, sparse = measured["full_block_ms"], measured["sparse_block_ms"]
        rows.append(
            {
                "bench": "training_step",
                "resolution": name,
                "grid": grid,
                "blocks": args.blocks,
                "activation_checkpointing": args.checkpointing,
                **measured,
                "block_speedup": full / sparse,
                "model_speedup": measured["full_model_ms"] / measured["hybrid_model_ms"],
                # The 40-block OSP-Next layout (8 full + 32 sparse) composed from the single-block times.
                "projected_40_block_speedup": 40 * full / (8 * full + 32 * sparse),
            }
        )
    return rows


def print_table(rows):
    for row in rows:
        if row["bench"] == "attention_op":
            print(
                f"attention {row['resolution']:>5} N={row['tokens']:>6}: fwd full {row['full_fwd_ms']:8.2f} ms "
                f"skiparse {row['skiparse_fwd_ms']:8.2f} ms ({row['fwd_speedup']:.2f}x) | fwd+bwd full "
                f"{row['full_fwdbwd_ms']:8.2f} ms ({row['full_fwdbwd_tflops']:.0f} TFLOP/s) skiparse "
                f"{row['skiparse_fwdbwd_ms']:8.2f} ms ({row['fwdbwd_speedup']:.2f}x; with layout moves "
                f"{row['fwdbwd_speedup_with_layout']:.2f}x)"
            )
        else:
            print(
                f"step      {row['resolution']:>5}: block full {row['full_block_ms']:8.1f} ms "
                f"({row['full_block_model_tflops']:.0f} TFLOP/s) sparse {row['sparse_block_ms']:8.1f} ms "
                f"({row['block_speedup']:.2f}x) | {row['blocks']}-block model full {row['full_model_ms']:9.1f} ms "
                f"({row['full_model_model_tflops']:.0f} TFLOP/s) hybrid {row['hybrid_model_ms']:9.1f} ms "
                f"({row['model_speedup']:.2f}x) | 40-block projection {row['projected_40_block_speedup']:.2f}x"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (for tests)")
    parser.add_argument("--heads", type=int, default=40, help="attention heads (wan-14b: 40)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (wan-14b: 128)")
    parser.add_argument(
        "--blocks",
        type=int,
        default=5,
        help="blocks of the multi-block step, a multiple of 5 with OSP-Next's 1:4 full:sparse "
        "ratio (default 5: 1 full + 4 sparse, which fits one H200 at 768P without recompute)",
    )
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="activation checkpointing on every block (default off)",
    )
    parser.add_argument("--attention-backend", default="auto", help="attention backend passed to the dispatcher")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--skip", choices=["op", "model"], action="append", default=[], help="skip a part")
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--out", default="skiparse_bench.json", help="JSON output path")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.tiny:
        args.heads, args.head_dim, args.blocks, args.warmup, args.repeat = 2, 16, 5, 1, 2
    resolutions = TINY_RESOLUTIONS if args.tiny else {name: RESOLUTIONS[name] for name in args.resolutions}
    ensure_single_rank_group()
    rows = []
    if "op" not in args.skip:
        rows += attention_op_rows(args, device, dtype, resolutions)
    if "model" not in args.skip:
        rows += model_rows(args, device, dtype, resolutions)
    print_table(rows)
    return write_report(args.out, rows, device, dtype=str(dtype))


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
