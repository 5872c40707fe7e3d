"""Kernel-time breakdown of one DiT training step (full and Skiparse block) with torch.profiler.

Shows where a block's time goes beyond attention and GEMMs. Example: python benchmarks/profile_block.py --out prof.txt
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_skiparse import RESOLUTIONS, build_dit  # noqa: E402

from osp_megatron.parallel.state import ensure_single_rank_group  # noqa: E402


def profile(args, sparse: bool, device, dtype, grid) -> str:
    model, _ = build_dit(args, device, dtype, sparse, 1, 0 if sparse else 1)
    x = torch.randn(1, 16, grid[0], grid[1] * 2, grid[2] * 2, device=device, dtype=dtype)
    timestep, text = torch.tensor([500.0], device=device), torch.randn(1, 512, 4096, device=device, dtype=dtype)

    def step():
        model(x, timestep, text).float().square().mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    title = f"== {'sparse' if sparse else 'full'} block, grid {grid} =="
    return title + "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="768P", choices=list(RESOLUTIONS))
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--out", default="block_profile.txt")
    args = parser.parse_args()
    args.tiny, args.heads, args.head_dim, args.checkpointing, args.attention_backend = False, 40, 128, False, "auto"
    ensure_single_rank_group()
    device, dtype = torch.device("cuda"), torch.bfloat16
    text = "\n\n".join(profile(args, sparse, device, dtype, RESOLUTIONS[args.resolution]) for sparse in (False, True))
    print(text)
    with open(args.out, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
