"""Sequence parallelism on several GPUs: training-step time and bytes of full+Ulysses, hybrid+Ulysses, hybrid+SSP.

Example (4 H200): torchrun --nproc_per_node 4 benchmarks/bench_sequence_parallel.py --out sp.json
"""

import argparse
import json
import math
import os
import sys
from datetime import date

# NVLink SHARP multicast (NVLS) stays off unless the caller chose otherwise; it must be set before NCCL starts.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402
from common import hybrid_layout, random_model, timed  # noqa: E402

from osp_megatron.utils.logging import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from osp_megatron.attention.dispatch import dot_product_attention  # noqa: E402
from osp_megatron.config.loader import from_dict  # noqa: E402
from osp_megatron.models.config import ModelConfig  # noqa: E402
from osp_megatron.models.flops import training_flops  # noqa: E402
from osp_megatron.models.wan.spec import wan_layer_spec  # noqa: E402
from osp_megatron.parallel import state  # noqa: E402
from osp_megatron.parallel.ledger import ledger  # noqa: E402

# Latent (T, H, W) of 81 frames; the patch (1, 2, 2) gives token grids 21x45x80 (720P) and 21x48x80 (768P).
RESOLUTIONS = {"720P": (21, 90, 160), "768P": (21, 96, 160)}
TINY_RESOLUTIONS = {"tiny-odd": (2, 10, 12), "tiny-even": (3, 16, 16)}
WAN_14B = dict(preset="wan-14b")  # dim 5120, 40 heads x 128, ffn 13824, text 4096 x 512
TINY = dict(preset="tiny", dim=64, num_heads=4, ffn_dim=128, text_dim=32, text_len=32)
LAYOUTS = ("a_full_ulysses", "b_hybrid_ulysses", "c_hybrid_ssp")
DESCRIPTIONS = {
    "a_full_ulysses": "(a) full attention, Ulysses over all ranks",
    "b_hybrid_ulysses": "(b) hybrid, Ulysses everywhere (inside subsequences in sparse blocks)",
    "c_hybrid_ssp": "(c) hybrid, SSP (Ulysses over the rest of the ranks, if any)",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Time forward+backward training steps of a wan-14b-wide DiT under three sequence-parallel "
        "layouts on every rank of torchrun (NCCL on GPUs, gloo on CPU), with the communication ledger; also "
        "our Ulysses full layer against DeepSpeed's DistributedAttention when deepspeed imports."
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=10,
        help="DiT blocks, a multiple of 5; a fifth of them full attention (half at each end for "
        "multiples of 10, OSP-Next's 8:32), the rest Skiparse P=2 (default 10: 2 full + 8 sparse)",
    )
    parser.add_argument(
        "--resolutions",
        nargs="+",
        default=None,
        help=f"which of {list(RESOLUTIONS)} to run (default all; --tiny: {list(TINY_RESOLUTIONS)})",
    )
    parser.add_argument(
        "--layouts",
        nargs="*",
        default=list(LAYOUTS),
        choices=LAYOUTS,
        help="layouts to time (none: only the DeepSpeed comparison)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--backend", default="auto", help="attention backend (osp_megatron.attention.dispatch)")
    parser.add_argument(
        "--no-activation-checkpointing",
        action="store_true",
        help="keep block activations instead of recomputing them (default: recompute)",
    )
    parser.add_argument("--skip-deepspeed", action="store_true", help="skip the DeepSpeed comparison")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU with gloo (for tests)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file (rank 0)")
    return parser.parse_args(argv)


# -- timing -----------------------------------------------------------------------------------------------------
def layout_degrees(layout: str, world: int) -> tuple[int, int]:
    """(ssp, ulysses) of a layout on `world` ranks; SSP takes as many ranks as P^2 = 4 allows."""
    if layout == "c_hybrid_ssp":
        ssp = math.gcd(world, 4)
        return ssp, world // ssp
    return 1, world


def configure(ssp: int, ulysses: int, backend: str):
    state.destroy_model_parallel()
    return state.init_distributed(state.ParallelConfig(ssp=ssp, ulysses=ulysses, backend=backend))


def model_config(args, layout: str, num_layers: int = None, sparse: bool = None) -> ModelConfig:
    blocks = num_layers or args.blocks
    hybrid = layout != "a_full_ulysses" if sparse is None else sparse
    fields = dict(
        TINY if args.tiny else WAN_14B,
        num_layers=blocks,
        sparse_ratio=2 if hybrid else 1,
        attention_backend=args.backend,
        activation_checkpointing=not args.no_activation_checkpointing,
    )
    if hybrid:
        fields["block_layout"] = hybrid_layout(blocks) if blocks > 1 else ["token"]
    return from_dict(ModelConfig, fields, "model")


def inputs(config: ModelConfig, latent, device, dtype):
    generator = torch.Generator().manual_seed(1)  # identical on every rank: the inputs are replicated
    latents = torch.randn(1, config.in_channels, *latent, generator=generator)
    target = torch.randn(latents.shape, generator=generator)
    text = torch.randn(1, config.text_len, config.text_dim, generator=generator)
    return latents.to(device, dtype), torch.tensor([500.0], device=device), text.to(device, dtype), target.to(device)


def training_step(model, batch):
    latents, timestep, text, target = batch
    model.zero_grad(set_to_none=True)
    prediction = model(latents, timestep, text)
    torch.nn.functional.mse_loss(prediction.float(), target).backward()


def peak_memory_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def time_layout(args, layout, latent, world, device, dtype):
    ssp, ulysses = layout_degrees(layout, world)
    config = model_config(args, layout)
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    model = random_model(config, device, dtype)
    batch = inputs(config, latent, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = timed(lambda: training_step(model, batch), args.warmup, args.steps, device)
    ledger().reset()
    training_step(model, batch)  # one more step, counted by the ledger
    comm = {key: int(value) for key, value in ledger().scalars().items()}
    by_phase = {phase: ledger().total_bytes(phase=phase) for phase in ("forward", "backward", "recompute")}
    result = dict(
        ssp=ssp,
        ulysses=ulysses,
        block_kinds=config.block_kinds(),
        step_ms=step_ms,
        tflops_per_gpu=training_flops(config, grid) / (step_ms / 1e3) / world / 1e12,
        peak_memory_gb=peak_memory_gb(device),
        comm_bytes_per_step=comm,
        comm_bytes_by_phase=by_phase,
        ledger=ledger().table(),
    )
    model = batch = None  # free them before the next layout
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# -- our Ulysses full layer against DeepSpeed's -------------------------------------------------------------------
def deepspeed_attention_class():
    """DeepSpeed's DistributedAttention, or (None, reason) when deepspeed does not import here."""
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        # DeepSpeed's collectives go through deepspeed.comm, which wraps the running torch.distributed.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    except Exception as error:  # deepspeed can fail at import for reasons other than ImportError (CUDA toolkit)
        return None, f"deepspeed does not import: {type(error).__name__}: {str(error)[:200]}"
    return DistributedAttention, ""


def deepspeed_core(distributed_attention_class):
    """A self-attention core (our spec slot) that runs DeepSpeed's DistributedAttention over the context group."""
    import inspect

    takes_batch_dim = "batch_dim_idx" in inspect.signature(distributed_attention_class.forward).parameters

    class DeepSpeedUlyssesCore(torch.nn.Module):
        def __init__(self, config=None, **kwargs):
            super().__init__()
            self.attention = None

        def forward(self, q, k, v, context):
            if self.attention is None:

                def local(q_, k_, v_, *unused, **unused_kw):
                    return dot_product_attention(q_, k_, v_, backend=context.backend)

                # [B, N, heads, head_dim]: heads scattered (dim 2), sequence gathered (dim 1).
                self.attention = distributed_attention_class(local, context.sequence_group, scatter_idx=2, gather_idx=1)
            if takes_batch_dim:
                return self.attention(q, k, v, 0)
            return self.attention(q, k, v)

    return DeepSpeedUlyssesCore


def compare_deepspeed(args, latent, world, device, dtype, backend):
    """One full-attention block (plus embeddings and head) with our Ulysses core, then DeepSpeed's."""
    attention_class, reason = deepspeed_attention_class()
    if args.skip_deepspeed:
        return {"skipped": "--skip-deepspeed"}
    if attention_class is None:
        return {"skipped": reason}
    configure(1, world, backend)
    config = model_config(args, "a_full_ulysses", num_layers=1, sparse=False)
    batch = inputs(config, latent, device, dtype)
    times, outputs = {}, []
    for name, spec in (
        ("ours_ms", None),
        (
            "deepspeed_ms",
            wan_layer_spec(self_attention_core=deepspeed_core(attention_class), cross_attn_norm=config.cross_attn_norm),
        ),
    ):
        model = random_model(config, device, dtype, layer_spec=spec)  # same seed: the same weights
        times[name] = timed(lambda: training_step(model, batch), args.warmup, args.steps, device)
        with torch.no_grad():
            outputs.append(model(*batch[:3]).float())
        model = None  # free the weights before the next case
    times["deepspeed_over_ours"] = times["deepspeed_ms"] / times["ours_ms"]
    times["max_abs_output_difference"] = float((outputs[0] - outputs[1]).abs().max())
    return times


# -- report -------------------------------------------------------------------------------------------------------
def table(results, deepspeed) -> str:
    lines = [
        f"{'resolution':<10} {'layout':<18} {'ssp':>3} {'uly':>3} {'step ms':>10} {'TFLOP/s/GPU':>11} "
        f"{'comm MiB/step':>13} {'peak GiB':>8}"
    ]
    for row in results:
        for layout, result in row["layouts"].items():
            comm = result["comm_bytes_per_step"].get("comm/total_bytes", 0) / 2**20
            lines.append(
                f"{row['resolution']:<10} {layout:<18} {result['ssp']:>3} {result['ulysses']:>3} "
                f"{result['step_ms']:>10.1f} {result['tflops_per_gpu']:>11.1f} {comm:>13.1f} "
                f"{result['peak_memory_gb']:>8.1f}"
            )
        ratios = ", ".join(f"{key} {value:.3f}" for key, value in row.items() if key.startswith("speedup"))
        if ratios:
            lines.append(f"{'':<10} {ratios}")
        ds = deepspeed.get(row["resolution"], {})
        if "skipped" in ds:
            lines.append(f"{'':<10} DeepSpeed comparison skipped: {ds['skipped']}")
        elif ds:
            lines.append(
                f"{'':<10} one full layer: ours {ds['ours_ms']:.1f} ms, DeepSpeed DistributedAttention "
                f"{ds['deepspeed_ms']:.1f} ms (x{ds['deepspeed_over_ours']:.3f}); outputs differ by at "
                f"most {ds['max_abs_output_difference']:.2e}"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.tiny
    backend = "nccl" if use_cuda else "gloo"
    device = configure(1, 1, backend)  # starts torch.distributed from torchrun's environment
    if not use_cuda:
        device = torch.device("cpu")
    world = dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if use_cuda else "fp32")]
    resolutions = TINY_RESOLUTIONS if args.tiny else RESOLUTIONS
    names = args.resolutions or list(resolutions)
    unknown = [name for name in names if name not in resolutions]
    if unknown:
        raise SystemExit(f"unknown resolutions {unknown}; choose from {list(resolutions)}")
    rows = {name: {"resolution": name, "latent": list(resolutions[name]), "layouts": {}} for name in names}
    for layout in args.layouts:  # layouts outside: the process groups change once per layout
        configure(*layout_degrees(layout, world), backend)
        for name in names:
            rows[name]["layouts"][layout] = time_layout(args, layout, resolutions[name], world, device, dtype)
    results, deepspeed = [], {}
    for name, row in rows.items():
        latent = resolutions[name]
        timed_layouts = row["layouts"]
        if "c_hybrid_ssp" in timed_layouts:
            for other, key in (("a_full_ulysses", "ratio_c_over_a"), ("b_hybrid_ulysses", "ratio_c_over_b")):
                if other in timed_layouts:
                    row[key] = timed_layouts["c_hybrid_ssp"]["step_ms"] / timed_layouts[other]["step_ms"]
                    # speed-up of (c) over the other layout: its step time over (c)'s
                    row[key.replace("ratio_c_over", "speedup_c_vs")] = 1.0 / row[key]
                    row[key.replace("ratio", "comm_ratio")] = timed_layouts["c_hybrid_ssp"]["comm_bytes_per_step"].get(
                        "comm/total_bytes", 0
                    ) / max(1, timed_layouts[other]["comm_bytes_per_step"].get("comm/total_bytes", 0))
        deepspeed[name] = compare_deepspeed(args, latent, world, device, dtype, backend)
        results.append(row)
    report = {
        "benchmark": "sequence_parallel",
        "date": date.today().isoformat(),
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        "dtype": str(dtype),
        "blocks": args.blocks,
        "activation_checkpointing": not args.no_activation_checkpointing,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "layouts": DESCRIPTIONS,
        "results": results,
        "deepspeed_full_layer": deepspeed,
    }
    if dist.get_rank() == 0:
        print(table(results, deepspeed), flush=True)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    try:
        main()
    finally:
        state.destroy_distributed()
    sys.exit(0)
