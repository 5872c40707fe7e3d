"""FP8 / HiF8 quantized training vs BF16 on one GPU: wan-14b GEMM shapes and DiT training steps.

Prints a table and writes JSON. Example (one H200): python benchmarks/bench_fp8.py --out fp8.json
`--tiny` runs the same code on CPU with toy sizes (used by the test suite).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_skiparse import RESOLUTIONS, TINY_RESOLUTIONS, build_dit  # noqa: E402
from common import hybrid_layout, timed, write_report  # noqa: E402

from osp_megatron.config.loader import from_dict  # noqa: E402
from osp_megatron.engine.parallelize import parallelize_dit  # noqa: E402
from osp_megatron.models.builder import build_model  # noqa: E402
from osp_megatron.models.config import ModelConfig  # noqa: E402
from osp_megatron.models.flops import forward_flops  # noqa: E402
from osp_megatron.parallel.state import ensure_single_rank_group  # noqa: E402
from osp_megatron.quantization import QuantConfig, apply_quantization, selection  # noqa: E402

# (name, in_features, out_features) of the GEMMs of a block (q/k/v as one GEMM), and the tokens of one sample.
GEMM_SETS = {
    "wan-14b": (80640, [("qkvo", 5120, 5120), ("ffn_up", 5120, 13824), ("ffn_down", 13824, 5120)]),
    "wan-1.3b": (
        32760,  # 480P, 81 frames
        [("qkv", 1536, 4608), ("o", 1536, 1536), ("ffn_up", 1536, 8960), ("ffn_down", 8960, 1536)],
    ),
}


def quant_config(recipe: str, backend: str = "auto", include=None, select: str = "measured") -> QuantConfig:
    """The quant section for `recipe`; the model default quantizes the DiT blocks' linears.

    A "+attn" suffix (e.g. fp8_hybrid+attn) also runs the self-attention in FP8 (quant.attention).
    """
    recipe, _, suffix = recipe.partition("+")
    if suffix not in ("", "attn"):
        raise SystemExit(f"recipe suffix '+{suffix}': only '+attn' (FP8 attention) is known")
    fields = {"recipe": recipe, "backend": backend, "attention": suffix == "attn", "select": select}
    if include is not None:
        fields["modules"] = {"include": include, "exclude": []}
    return from_dict(QuantConfig, fields, "quant")


def linear_rows(args, device, dtype):
    rows = []
    gemm_sets = {"toy": (256, [("toy", 64, 128)])} if args.tiny else {name: GEMM_SETS[name] for name in args.gemms}
    for model_name, (default_tokens, gemms) in gemm_sets.items():
        tokens = args.tokens or default_tokens
        rows += gemm_rows(args, device, dtype, model_name, tokens, gemms)
    return rows


def gemm_rows(args, device, dtype, model_name, tokens, gemms):
    """bf16 against each recipe for every GEMM of one model, forward + backward of one linear layer."""
    rows = []
    for name, fan_in, fan_out in gemms:
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, fan_out, device=device, dtype=dtype)
        measured = {}
        for label, recipe in (("bf16", None), *((r, r) for r in args.recipes)):
            layer = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, device=device, dtype=dtype))
            if recipe is not None:
                config = quant_config(recipe, args.backend, include=["*"], select=args.select)
                assert apply_quantization(layer, config)

            def step():
                layer(x).backward(grad)

            ms = timed(step, args.warmup, args.repeat, device)
            measured[f"{label}_ms"] = ms
            measured[f"{label}_tflops"] = 6 * tokens * fan_in * fan_out / ms / 1e9
        rows.append(
            {
                "bench": "linear",
                "model": model_name,
                "select": args.select,
                "gemm": name,
                "gemm_choices": [
                    d.describe()
                    for d in selection.decisions()
                    if (d.shape.tokens, d.shape.in_features, d.shape.out_features) == (tokens, fan_in, fan_out)
                ],
                "tokens": tokens,
                "in": fan_in,
                "out": fan_out,
                **measured,
                **{f"{r}_speedup": measured["bf16_ms"] / measured[f"{r}_ms"] for r in args.recipes},
            }
        )
    return rows


def step_rows(args, device, dtype):
    rows = []
    resolutions = TINY_RESOLUTIONS if args.tiny else {k: RESOLUTIONS[k] for k in args.resolutions}
    for name, grid in resolutions.items():
        latent = (grid[0], grid[1] * 2, grid[2] * 2)
        x = torch.randn(1, 16, *latent, device=device, dtype=dtype)
        timestep = torch.tensor([500.0], device=device)
        text_len = 8 if args.tiny else 512
        text = torch.randn(1, text_len, 32 if args.tiny else 4096, device=device, dtype=dtype)
        measured = {}
        hybrid = hybrid_layout(args.blocks)
        cases = [("full_bf16_block", False, 1, None, None), ("sparse_bf16_block", True, 1, ["token"], None)]
        cases += [(f"sparse_{r}_block", True, 1, ["token"], r) for r in args.recipes]
        cases += [(f"full_{r}_block", False, 1, None, r) for r in args.recipes]
        cases += [("full_bf16_model", False, args.blocks, None, None)]
        cases += [(f"hybrid_{r}_model", True, args.blocks, hybrid, r) for r in args.recipes]
        for label, sparse, layers, layout, recipe in cases:
            model, config = build_dit(args, device, dtype, sparse, layers, layout=layout)
            if recipe is not None:
                assert apply_quantization(model, quant_config(recipe, args.backend, select=args.select))

            def step():
                model(x, timestep, text).float().square().mean().backward()

            try:
                ms = timed(step, args.warmup, args.repeat, device)
            except torch.OutOfMemoryError:  # e.g. the 5-block bf16 model at 768P on an 80 GB GPU
                ms = None
                print(f"{name} {label}: out of memory", flush=True)
            measured[f"{label}_ms"] = ms
            if ms is not None:
                measured[f"{label}_model_tflops"] = 3 * forward_flops(config, grid, text_len) / ms / 1e9
            if device.type == "cuda":
                measured[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            model = None  # free the weights before the next case
            if device.type == "cuda":
                torch.cuda.empty_cache()
        full = measured["full_bf16_block_ms"]
        row = {"bench": "training_step", "resolution": name, "blocks": args.blocks, **measured}
        for recipe in args.recipes:
            sparse, full_quantized = measured[f"sparse_{recipe}_block_ms"], measured[f"full_{recipe}_block_ms"]
            full_model, hybrid_model = measured["full_bf16_model_ms"], measured[f"hybrid_{recipe}_model_ms"]
            if full_model is not None and hybrid_model is not None:
                row[f"{recipe}_hybrid_vs_full_bf16_model"] = full_model / hybrid_model
            # 40 blocks of OSP-Next's layout (8 full + 32 sparse), all quantized, against 40 full bf16 blocks.
            if None not in (full, sparse, full_quantized):
                row[f"{recipe}_projected_40_block_vs_full_bf16"] = 40 * full / (8 * full_quantized + 32 * sparse)
        rows.append(row)
    return rows


def loss_rows(args, device, dtype):
    """Loss curves of a small hybrid DiT (head_dim 128, so FP8 attention runs) trained in bf16 and each recipe."""
    fields = {"preset": "tiny", "num_layers": 3, "full_blocks": 1, "sparse_ratio": 2}
    if not args.tiny:
        fields.update(dim=256, num_heads=2, ffn_dim=512)
    config = from_dict(ModelConfig, fields, "model")
    generator = torch.Generator(device=device).manual_seed(0)
    frames, size = (2, 8) if args.tiny else (4, 32)
    x, target = (
        torch.randn(2, 16, frames, size, size, device=device, dtype=dtype, generator=generator) for _ in range(2)
    )
    text = torch.randn(2, config.text_len, config.text_dim, device=device, dtype=dtype, generator=generator)
    timestep = torch.tensor([300.0, 700.0], device=device)
    curves = {}
    for label in ("bf16", *args.recipes):
        torch.manual_seed(0)
        model = build_model(config)
        quant = None if label == "bf16" else quant_config(label, args.backend, select=args.select)
        parallelize_dit(model, "train", quant=quant)
        model.to(device=device, dtype=dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses = []
        for _ in range(args.loss_steps):
            loss = (model(x, timestep, text).float() - target.float()).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves[label] = losses
    tail = max(1, args.loss_steps // 10)
    final = {label: sum(losses[-tail:]) / tail for label, losses in curves.items()}
    return [
        {
            "bench": "loss_curve",
            "steps": args.loss_steps,
            "final_loss": final,
            "relative_to_bf16": {label: value / final["bf16"] - 1 for label, value in final.items()},
            "curves": curves,
        }
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (for tests)")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["fp8_hybrid", "hif8"],
        help="quant.recipe values to compare with bf16; append +attn for FP8 attention too",
    )
    parser.add_argument("--backend", default="auto", help="quant.backend (auto: real FP8 GEMMs on SM90)")
    parser.add_argument(
        "--gemms", nargs="+", default=["wan-14b"], choices=list(GEMM_SETS), help="whose block GEMMs to time"
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="GEMM rows (default: one sample, 80640 for wan-14b at 768P)"
    )
    parser.add_argument(
        "--select",
        choices=("measured", "all"),
        default="measured",
        help="quant.select: FP8 only for the shapes measured faster than bf16 (default), or always",
    )
    parser.add_argument("--resolutions", nargs="+", default=["768P", "720P"], choices=list(RESOLUTIONS))
    parser.add_argument("--blocks", type=int, default=5, help="blocks of the model step (1:4 full:sparse)")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="activation checkpointing on every block (default off: 5 blocks fit at 768P)",
    )
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip", choices=["linear", "step", "loss"], action="append", default=[])
    parser.add_argument("--loss-steps", type=int, default=100, help="training steps of the loss-curve comparison")
    parser.add_argument("--out", default="fp8_bench.json")
    args = parser.parse_args(argv)
    args.attention_backend = "auto"
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.tiny:
        args.heads, args.head_dim, args.blocks, args.warmup, args.repeat = 2, 16, 5, 1, 1
    ensure_single_rank_group()
    rows = []
    if "linear" not in args.skip:
        rows += linear_rows(args, device, dtype)
    if "step" not in args.skip:
        rows += step_rows(args, device, dtype)
    if "loss" not in args.skip:
        rows += loss_rows(args, device, dtype)
    for row in rows:
        shown = {k: v for k, v in row.items() if k != "curves"}
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in shown.items()}))
    return write_report(args.out, rows, device)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
