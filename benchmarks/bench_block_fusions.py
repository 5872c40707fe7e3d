"""The block's fusions on and off, side by side: one full and one sparse wan-14b block at 768P, forward+backward.

Variants switch the two structural fusions of models/wan/layers.py back to their unfused forms by replacing
methods for the run: "qkv" (q, k and v from one GEMM over the concatenated weights) and "resnorm" (residual
and the following norm as one pass with two outputs). Prints one line per variant and writes JSON.

    python benchmarks/bench_block_fusions.py --out block_fusions.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_skiparse import RESOLUTIONS, build_dit  # noqa: E402
from common import timed, write_report  # noqa: E402

from osp_megatron.models.wan import fused, layers  # noqa: E402
from osp_megatron.parallel.state import ensure_single_rank_group  # noqa: E402

FUSED = {"qkv": layers.column_linears_together, "resnorm": layers.WanDiTLayer.forward}


def _unfused_block_forward(self, hidden, text_states, modulation, rope, context):
    """WanDiTLayer.forward with the residuals and norms as separate passes."""
    shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (self.modulation + modulation.float()).chunk(6, dim=1)
    attended, bias = self.self_attention(fused.modulated_layer_norm(hidden, shift, scale, self.eps), context, rope=rope)
    hidden = fused.gated_residual(hidden, attended, gate, bias)
    crossed, bias = self.cross_attention(
        self.norm2(hidden), layers.AttentionContext(backend=context.backend), text_states=text_states
    )
    hidden = fused.residual(hidden, crossed, bias)
    ffn_out, ffn_bias = self.mlp(fused.modulated_layer_norm(hidden, ffn_shift, ffn_scale, self.eps))
    return fused.gated_residual(hidden, ffn_out, ffn_gate, ffn_bias)


def use_fusions(qkv: bool, resnorm: bool) -> None:
    layers.column_linears_together = FUSED["qkv"] if qkv else (lambda input, linears: None)
    layers.WanDiTLayer.forward = FUSED["resnorm"] if resnorm else _unfused_block_forward


VARIANTS = {"all": (True, True), "none": (False, False), "qkv_only": (True, False), "resnorm_only": (False, True)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", default="768P", choices=list(RESOLUTIONS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="block_fusions.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_block_fusions.py needs a CUDA GPU")
    model_args = argparse.Namespace(tiny=False, checkpointing=False, attention_backend="auto", heads=40, head_dim=128)
    ensure_single_rank_group()
    device, dtype = torch.device("cuda"), torch.bfloat16
    grid = RESOLUTIONS[args.resolution]
    x = torch.randn(1, 16, grid[0], grid[1] * 2, grid[2] * 2, device=device, dtype=dtype)
    timestep, text = torch.tensor([500.0], device=device), torch.randn(1, 512, 4096, device=device, dtype=dtype)
    rows = []
    for name in args.variants:
        use_fusions(*VARIANTS[name])
        row = {"variant": name, "resolution": args.resolution}
        for label, sparse, layout in (("full", False, None), ("sparse", True, ["token"])):
            model, _ = build_dit(model_args, device, dtype, sparse, 1, layout=layout)

            def step():
                model(x, timestep, text).float().square().mean().backward()

            row[f"{label}_block_ms"] = timed(step, args.warmup, args.repeat, device)
            model = None  # free the weights before the next case
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    use_fusions(True, True)
    write_report(args.out, rows, device)


if __name__ == "__main__":
    main()
