"""Kernel-time breakdown of one DiT training step (full and Skiparse block) with torch.profiler.

Shows where a block's time goes beyond attention and GEMMs; `--trace DIR` also writes Chrome traces and
reports the GPU's idle gaps (trace_gaps.py), `--reference` profiles a plain-PyTorch block beside ours.
Example: python benchmarks/profile_block.py --out prof.txt --trace traces --reference
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_skiparse import RESOLUTIONS, build_dit  # noqa: E402
from common import hybrid_layout, timed  # noqa: E402
from reference_block import plain_step  # noqa: E402
from trace_gaps import analyse  # noqa: E402

from osp_megatron.models.flops import forward_flops  # noqa: E402
from osp_megatron.parallel.state import ensure_single_rank_group  # noqa: E402


def framework_step(args, sparse: bool, device, dtype, grid, blocks: int = 1):
    layout = (hybrid_layout(blocks) if blocks > 1 else ["token"]) if sparse else None
    model, config = build_dit(args, device, dtype, sparse, blocks, layout=layout)
    x = torch.randn(1, 16, grid[0], grid[1] * 2, grid[2] * 2, device=device, dtype=dtype)
    timestep, text = torch.tensor([500.0], device=device), torch.randn(1, 512, 4096, device=device, dtype=dtype)

    def step():
        model(x, timestep, text).float().square().mean().backward()

    return step, 3 * forward_flops(config, grid, 512)


def reference_step(args, device, dtype, grid):
    tokens, dim = math.prod(grid), args.heads * args.head_dim
    step = plain_step(dim, args.heads, 13824, tokens, 512, device, dtype)
    block_flops = 8 * tokens * dim * dim + 4 * tokens * tokens * dim + 4 * tokens * dim * dim
    block_flops += 4 * 512 * dim * dim + 4 * tokens * 512 * dim + 4 * tokens * dim * 13824
    return step, 3 * block_flops


def profile(args, label, step, flops, device) -> str:
    ms = timed(step, 3, args.repeat, device)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if args.trace:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    title = (
        f"== {label}: {ms:.1f} ms per step (event-timed median of {args.repeat}), "
        f"{flops / ms / 1e9:.0f} model TFLOP/s =="
    )
    text = (
        title
        + "\n"
        + prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70)
    )
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        path = os.path.join(args.trace, label.replace(" ", "_") + ".json")
        prof.export_chrome_trace(path)
        text += "\n" + analyse(path)
    print(text, flush=True)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="768P", choices=list(RESOLUTIONS))
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5, help="event-timed steps before the profiled one")
    parser.add_argument("--trace", default=None, help="folder for Chrome traces + GPU idle-gap report")
    parser.add_argument("--reference", action="store_true", help="also profile a plain-PyTorch full block")
    parser.add_argument(
        "--model-blocks",
        type=int,
        default=0,
        help="also profile the hybrid model of this many blocks (1:4 full:sparse, no recompute)",
    )
    parser.add_argument("--skip-blocks", action="store_true", help="skip the single full and sparse blocks")
    parser.add_argument("--out", default="block_profile.txt")
    args = parser.parse_args()
    args.tiny, args.heads, args.head_dim, args.checkpointing, args.attention_backend = False, 40, 128, False, "auto"
    ensure_single_rank_group()
    device, dtype, grid = torch.device("cuda"), torch.bfloat16, RESOLUTIONS[args.resolution]
    reports = []
    for sparse in () if args.skip_blocks else (False, True):
        step, flops = framework_step(args, sparse, device, dtype, grid)
        reports.append(profile(args, f"{'sparse' if sparse else 'full'} block {args.resolution}", step, flops, device))
        del step
        torch.cuda.empty_cache()
    if args.model_blocks:
        step, flops = framework_step(args, True, device, dtype, grid, args.model_blocks)
        reports.append(profile(args, f"hybrid {args.model_blocks}-block model {args.resolution}", step, flops, device))
        del step
        torch.cuda.empty_cache()
    if args.reference:
        step, flops = reference_step(args, device, dtype, grid)
        reports.append(profile(args, f"plain reference block {args.resolution}", step, flops, device))
    with open(args.out, "w") as handle:
        handle.write("\n\n".join(reports))


if __name__ == "__main__":
    main()
