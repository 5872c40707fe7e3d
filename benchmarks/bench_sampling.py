"""Seconds per generated video (81 frames, 50 steps, CFG) for wan-1.3b / wan-14b shapes, full vs hybrid Skiparse,
on one GPU or two (SSP = 2, or CFG parallel). Random weights; a few timed denoising steps are projected to 50.

Example (1 H200): python benchmarks/bench_sampling.py --out sampling_1gpu.json
         (2 H200): torchrun --nproc_per_node 2 benchmarks/bench_sampling.py --compare sampling_1gpu.json \\
                       --out sampling_2gpu.json
"""

import argparse
import json
import os
import sys
import time

# NVLink SHARP multicast (NVLS) stays off unless the caller chose otherwise; it must be set before NCCL starts.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import random_model, timed, write_report  # noqa: E402

from osp_megatron.utils.logging import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from osp_megatron.config.loader import from_dict  # noqa: E402
from osp_megatron.inference.guidance import BatchedGuidance, ParallelGuidance  # noqa: E402
from osp_megatron.inference.replicas import build_sampling_layout  # noqa: E402
from osp_megatron.models.config import ModelConfig  # noqa: E402
from osp_megatron.parallel import state  # noqa: E402

# Latent (T, H, W) of 81 frames: 480x832 -> 21x60x104, 1280x720 -> 21x90x160 (VAE stride 4, 8, 8).
RESOLUTIONS = {"480P": (21, 60, 104), "720P": (21, 90, 160)}
TINY_RESOLUTIONS = {"tiny": (3, 8, 8)}
MODELS = {"wan-1.3b": dict(preset="wan-1.3b"), "wan-14b": dict(preset="wan-14b")}
TINY_MODELS = {"tiny": dict(preset="tiny")}
STEPS = 50
GUIDANCE = 5.0
# attention -> (sparse ratio, quant section of the sampling job or None)
ATTENTION = {"full": (1, None), "hybrid": (2, None), "hybrid_fp8": (2, {"recipe": "fp8_hybrid", "attention": True})}
# layout -> (ssp, cfg_parallel, gpus)
LAYOUTS = {"1gpu": (1, False, 1), "sp2": (2, False, 2), "cfg2": (1, True, 2)}
DESCRIPTIONS = {
    "1gpu": "one GPU, conditional + unconditional batched",
    "sp2": "two GPUs, each video over SSP = 2 (full-only models: the same ranks run Ulysses)",
    "cfg2": "two GPUs, conditional and unconditional passes on different GPUs (one exchange per step)",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Time text-to-video sampling: one denoising step (a DiT forward over the cond + uncond halves) "
        "of random-weight wan-1.3b / wan-14b models at 81 frames, full attention vs hybrid Skiparse (8 of 40 blocks "
        "full, P = 2), and the real-size Wan VAE decode; project to 50 steps. One process: one GPU; torchrun with 2 "
        "processes: SSP = 2 and CFG-parallel layouts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--models", nargs="+", default=None, help=f"of {list(MODELS)} (default: both)")
    parser.add_argument("--resolutions", nargs="+", default=None, help=f"of {list(RESOLUTIONS)} (default: both)")
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["full", "hybrid"],
        choices=list(ATTENTION),
        help="full: every block full attention, bf16; hybrid: 1:4 full:Skiparse; hybrid_fp8: hybrid "
        "with FP8 linears and FP8 attention (quant.recipe=fp8_hybrid, quant.attention=true; weights "
        "quantized once, as osp-sample does)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed denoising steps first (default 1)")
    parser.add_argument("--steps", type=int, default=1, help="timed denoising steps, median reported (default 1)")
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="time a model of this many blocks and scale to the full depth (default: full depth)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        help="JSON of a one-GPU run: speed-ups over it, and its VAE times (the decode is not timed again)",
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (for tests)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file (rank 0)")
    return parser.parse_args(argv)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def model_config(name, attention, blocks, tiny):
    fields = dict((TINY_MODELS if tiny else MODELS)[name], sparse_ratio=ATTENTION[attention][0])
    if blocks is not None:
        fields.update(num_layers=blocks, full_blocks=max(1, blocks // 10))
    return from_dict(ModelConfig, fields, "model")


def enter_layout(layout):
    """Process groups of `layout` (SSP and/or a CFG pair); returns the sampling layout."""
    ssp, cfg_parallel, _ = LAYOUTS[layout]
    state.destroy_model_parallel()
    state.init_distributed(state.ParallelConfig(ssp=ssp))
    return build_sampling_layout(cfg_parallel)


def time_denoising_step(config, latent, layout, sampling, device, dtype, args, attention="full"):
    """Median seconds of one guided denoising step, and the peak memory, under `layout` (entered already)."""
    from osp_megatron.quantization.config import QuantConfig

    _, cfg_parallel, _ = LAYOUTS[layout]
    reset_peak(device)
    quant = ATTENTION[attention][1]
    model = random_model(
        config, device, dtype, role="inference", quant=from_dict(QuantConfig, quant, "quant") if quant else None
    ).eval()
    generator = torch.Generator().manual_seed(1)  # identical on every rank
    latents = torch.randn(1, config.in_channels, *latent, generator=generator).to(device)
    text = torch.randn(2, config.text_len, config.text_dim, generator=generator).to(device, dtype)
    timestep = torch.full((1,), 500.0, device=device)

    def velocity(x, t, c):
        return model(x.to(dtype), t, c)

    if cfg_parallel:
        guided = ParallelGuidance(
            velocity, text[sampling.cfg_rank : sampling.cfg_rank + 1], GUIDANCE, sampling.cfg_group
        )
    else:
        guided = BatchedGuidance(velocity, text[:1], text[1:], GUIDANCE)
    with torch.no_grad():
        seconds = timed(lambda: guided(latents, timestep), args.warmup, args.steps, device) / 1e3
    memory = peak_gib(device)
    model = guided = None  # free the weights before the next case
    reset_peak(device)
    return seconds, memory


def time_vae_decode(latent, device, dtype, tiny):
    """Seconds and peak GiB of decoding one video's latents with the Wan VAE (real size, random weights)."""
    from diffusers import AutoencoderKLWan

    from osp_megatron.models.vae import tiny_wan_vae

    reset_peak(device)
    vae = (tiny_wan_vae() if tiny else AutoencoderKLWan()).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, vae.config.z_dim, *latent, generator=generator).to(device, dtype)
    with torch.no_grad():
        vae.decode(latents[:, :, :2])  # warm-up: the decoder runs latent frame by frame with the same shapes
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        vae.decode(latents)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tick
    memory = peak_gib(device)
    del vae
    reset_peak(device)
    return seconds, memory


def format_table(rows) -> str:
    header = (
        "| model | resolution | attention | layout | GPUs | step s | peak GiB | 50 steps s | VAE s (GiB) | "
        "video s | vs full | vs 1 GPU |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        versus_one = f"{r['speedup_vs_1gpu']:.2f}x" if r.get("speedup_vs_1gpu") else "-"
        versus_full = f"{r['speedup_vs_full']:.2f}x" if r.get("speedup_vs_full") else "-"
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['attention']} | {r['layout']} | {r['gpus']} | "
            f"{r['step_s']:.3f} | {r['step_peak_gib']:.1f} | {r['denoise_s']:.1f} | "
            f"{r['vae_s']:.1f} ({r['vae_peak_gib']:.1f}) | {r['video_s']:.1f} | {versus_full} | "
            f"{versus_one} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.tiny
    state.destroy_model_parallel()
    device = state.init_distributed(state.ParallelConfig(backend=None if use_cuda else "gloo"))
    if not use_cuda:
        device = torch.device("cpu")
    world = dist.get_world_size()
    if world not in (1, 2):
        raise SystemExit(f"run on 1 process (one GPU) or torchrun with 2 (two GPUs), not {world}")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    models = args.models or list(TINY_MODELS if args.tiny else MODELS)
    resolutions = TINY_RESOLUTIONS if args.tiny else RESOLUTIONS
    names = args.resolutions or list(resolutions)
    layouts = [name for name, (_, _, gpus) in LAYOUTS.items() if gpus == world]
    reference = json.load(open(args.compare)) if args.compare else None
    vae = {}
    for name in names:
        if reference is not None:
            row = next(r for r in reference["rows"] if r["resolution"] == name)
            vae[name] = (row["vae_s"], row["vae_peak_gib"])
        else:
            vae[name] = time_vae_decode(resolutions[name], device, dtype, args.tiny)
    rows = []
    # Layouts outermost: each one builds its process groups once. Rebuilding megatron's groups per model leaks
    # their NCCL communicators (tens of GiB of device memory over a sweep).
    for layout in layouts:
        sampling = enter_layout(layout)
        for model_name in models:
            for name in names:
                for attention in args.attention:
                    config = model_config(model_name, attention, args.blocks, args.tiny)
                    depth = model_config(model_name, attention, None, args.tiny).num_layers
                    step, memory = time_denoising_step(
                        config, resolutions[name], layout, sampling, device, dtype, args, attention
                    )
                    step *= depth / config.num_layers  # projection to the full depth when --blocks is given
                    rows.append(
                        dict(
                            model=model_name,
                            resolution=name,
                            attention=attention,
                            layout=layout,
                            gpus=world,
                            blocks_timed=config.num_layers,
                            blocks=depth,
                            step_s=step,
                            step_peak_gib=memory,
                            denoise_s=STEPS * step,
                            vae_s=vae[name][0],
                            vae_peak_gib=vae[name][1],
                            video_s=STEPS * step + vae[name][0],
                        )
                    )
    for row in rows:
        full = next(
            (
                r
                for r in rows
                if r["attention"] == "full" and all(r[k] == row[k] for k in ("model", "resolution", "layout"))
            ),
            None,
        )
        if full is not None and row["attention"] != "full":
            row["speedup_vs_full"] = full["video_s"] / row["video_s"]
            row["step_speedup_vs_full"] = full["step_s"] / row["step_s"]
        if reference is not None:
            one = next(
                (r for r in reference["rows"] if all(r[k] == row[k] for k in ("model", "resolution", "attention"))),
                None,
            )
            if one is not None:
                row["speedup_vs_1gpu"] = one["video_s"] / row["video_s"]
                row["step_speedup_vs_1gpu"] = one["step_s"] / row["step_s"]
    report = None
    if dist.get_rank() == 0:
        print(
            f"[bench_sampling] {world} GPU(s); {STEPS} steps projected from {args.steps} timed after "
            f"{args.warmup} warm-up; guidance {GUIDANCE}; text encoding not included"
        )
        print(format_table(rows))
        report = {
            "benchmark": "sampling",
            "world_size": world,
            "steps": STEPS,
            "timed_steps": args.steps,
            "layouts": {k: DESCRIPTIONS[k] for k in layouts},
            "rows": rows,
        }
        if args.out:
            write_report(args.out, rows, device, **{k: v for k, v in report.items() if k != "rows"})
    state.destroy_distributed()
    return report


if __name__ == "__main__":
    main()
