"""Peak GPU memory of real training steps against the memory model, and step time per checkpointing mode.

Runs osp-train's Trainer for a few steps per case (wan-1.3b 480P hybrid: checkpointing none / selective /
full, bf16 and fp8_hybrid, FSDP off, on or both) and compares torch.cuda.max_memory_allocated of the steady
steps with osp_megatron.training.memory's estimate.
Examples: python benchmarks/bench_memory.py --out memory.json                       (one H200, ~3 minutes)
          python benchmarks/bench_memory.py --fsdp on --recipes none --out memory_fsdp.json
          torchrun --nproc_per_node 2 benchmarks/bench_memory.py --ssp 2 --fsdp both --recipes none \
              --out memory2.json
`--tiny` runs the same cases on the CPU with the tiny model (times and estimates; no memory counter there).
"""

import argparse
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off unless the caller chose otherwise

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_report  # noqa: E402

from osp_megatron.utils.logging import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()

from osp_megatron.engine.config import load_job_config  # noqa: E402
from osp_megatron.parallel.config import ParallelConfig  # noqa: E402
from osp_megatron.quantization import selection  # noqa: E402
from osp_megatron.training.memory import GIB, estimate, run_from_config  # noqa: E402

MODES = ("none", "selective", "full")
RECIPES = ("none", "fp8_hybrid")
# wan-1.3b hybrid at 480P, 81 frames; the tiny case keeps the structure (hybrid, padded grid) at toy size.
SIZES = {
    "wan-1.3b-480P": [
        "model.preset=wan-1.3b",
        "data.latent_frames=21",
        "data.latent_height=60",
        "data.latent_width=104",
    ],
    "tiny": [
        "model.preset=tiny",
        "data.latent_frames=2",
        "data.latent_height=12",
        "data.latent_width=16",
        "train.device=cpu",
    ],
}


def case_overrides(args, size: str, mode: str, recipe: str, fsdp: bool, run_dir: str) -> list:
    overrides = SIZES[size] + [
        f"run.dir={run_dir}",
        f"data.path={run_dir}/data",
        "data.synthetic=true",
        f"data.synthetic_num_samples={4 * args.world}",
        f"data.synthetic_samples_per_shard={2 * args.world}",
        "model.sparse_ratio=2",
        f"model.activation_checkpointing={mode}",
        *recipe_overrides(recipe, args.select),
        "train.micro_batch_size=1",
        f"train.global_batch_size={args.world // args.ssp}",
        f"train.steps={args.steps}",
        "train.ema_decay=0.999",
        "train.progress=false",
        "train.sample_at_end=false",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=none",
        f"parallel.ssp={args.ssp}",
        f"parallel.data={args.world // args.ssp}",
    ]
    if fsdp:
        overrides.append("parallel.fsdp=true")
    return overrides


def recipe_overrides(recipe: str, select: str) -> list:
    """quant.* overrides for a recipe name; a "+attn" suffix (fp8_hybrid+attn) adds FP8 attention."""
    name, _, suffix = recipe.partition("+")
    if suffix not in ("", "attn"):
        raise SystemExit(f"recipe suffix '+{suffix}': only '+attn' (FP8 attention) is known")
    overrides = [f"quant.recipe={name}"]
    if name != "none":
        overrides.append(f"quant.select={select}")
    if suffix == "attn":
        overrides.append("quant.attention=true")
    return overrides


def fsdp_available() -> bool:
    return "fsdp" in ParallelConfig.__dataclass_fields__


def run_case(args, size, mode, recipe, fsdp) -> dict:
    """Train `args.steps` steps; peak allocated bytes and mean time of the steps after the first."""
    from osp_megatron.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = case_overrides(args, size, mode, recipe, fsdp, run_dir)
        if args.latent_frames is not None:
            overrides.append(f"data.latent_frames={args.latent_frames}")
        config = load_job_config(None, overrides)
        predicted = estimate(run_from_config(config))
        trainer = Trainer(config)
        cuda = trainer.device.type == "cuda"
        trainer.train_step()  # compiles, and allocates the optimizer state: not part of the steady steps
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        losses = [trainer.train_step()["loss"] for _ in range(args.steps - 1)]
        if cuda:
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - started) / max(args.steps - 1, 1)
        measured = torch.cuda.max_memory_allocated() if cuda else None
        if dist.is_initialized() and cuda:  # the fullest GPU decides whether a layout fits
            peak = torch.tensor([measured], dtype=torch.float64, device=trainer.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            measured = int(peak.item())
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    row = {
        "size": size,
        "latent_frames": config.data.latent_frames,
        "select": args.select,
        "gemm_choices": [decision.describe() for decision in selection.decisions()],
        "checkpointing": mode,
        "recipe": recipe,
        "fsdp": fsdp,
        "ssp": args.ssp,
        "world": args.world,
        "step_s": step_s,
        "loss": losses[-1] if losses else None,
        "estimate_gib": predicted.peak_bytes / GIB,
        "estimate_phase": predicted.peak_phase,
        "measured_peak_gib": None if measured is None else measured / GIB,
    }
    if measured is not None:
        row["estimate_error"] = predicted.peak_bytes / measured - 1
    return row


def add_ratios(rows) -> None:
    """Each quantized case's speed-up and peak memory against the bf16 case of the same mode and FSDP setting."""
    bf16 = {(r["checkpointing"], r["fsdp"]): r for r in rows if r["recipe"] == "none" and "error" not in r}
    for row in rows:
        base = bf16.get((row["checkpointing"], row["fsdp"]))
        if row["recipe"] == "none" or "error" in row or base is None:
            continue
        row["speedup_vs_bf16"] = base["step_s"] / row["step_s"]
        if row["measured_peak_gib"] is not None:
            row["peak_vs_bf16_gib"] = row["measured_peak_gib"] - base["measured_peak_gib"]


def print_table(rows) -> None:
    print(f"{'case':<34} {'step s':>7} {'measured GiB':>13} {'estimate GiB':>13} {'error':>7}  peak phase")
    for row in rows:
        if "error" in row:
            print(f"{row['checkpointing']} {row['recipe']}: {row['error']}")
            continue
        name = f"{row['checkpointing']} {row['recipe']}{' fsdp' if row['fsdp'] else ''}"
        measured = "-" if row["measured_peak_gib"] is None else f"{row['measured_peak_gib']:.2f}"
        error = "-" if "estimate_error" not in row else f"{100 * row['estimate_error']:+.1f}%"
        ratio = f"  {row['speedup_vs_bf16']:.3f}x bf16" if "speedup_vs_bf16" in row else ""
        print(
            f"{name:<34} {row['step_s']:7.3f} {measured:>13} {row['estimate_gib']:13.2f} {error:>7}  "
            f"{row['estimate_phase']}{ratio}"
        )


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="steps per case; the first is not measured (default 3)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="checkpointing modes")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="quant.recipe values (none = bf16)")
    parser.add_argument(
        "--fsdp",
        choices=("off", "on", "both"),
        default="off",
        help="FSDP cases: off (default), on, or both (on and both need parallel.fsdp in this checkout)",
    )
    parser.add_argument(
        "--select",
        choices=("measured", "all"),
        default="measured",
        help="quant.select of the quantized cases: FP8 only for shapes measured faster (default), or every layer",
    )
    parser.add_argument(
        "--latent-frames",
        type=int,
        default=None,
        help="data.latent_frames instead of the size's 21 (480P x 81 frames), e.g. 11 where 21 does not fit",
    )
    parser.add_argument("--ssp", type=int, default=1, help="parallel.ssp (the rest of the world is data parallel)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (for tests)")
    parser.add_argument("--out", default=None, help="write the rows as JSON to this file (rank 0)")
    args = parser.parse_args(argv)
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world % args.ssp:
        raise SystemExit(f"--ssp {args.ssp} does not divide the {args.world} ranks")
    fsdp_cases = {"off": [False], "on": [True], "both": [False, True]}[args.fsdp]
    if not fsdp_available():
        if args.fsdp == "on":
            raise SystemExit("--fsdp on: this checkout has no parallel.fsdp")
        fsdp_cases = [False]
    size = "tiny" if args.tiny else "wan-1.3b-480P"
    rows = []
    for fsdp in fsdp_cases:
        for recipe in args.recipes:
            for mode in args.modes:
                try:
                    rows.append(run_case(args, size, mode, recipe, fsdp))
                except torch.OutOfMemoryError as error:  # one case that does not fit keeps the others
                    rows.append({"checkpointing": mode, "recipe": recipe, "fsdp": fsdp, "error": f"OOM: {error}"[:300]})
                    gc.collect()
                    torch.cuda.empty_cache()
                print(rows[-1], flush=True)
                if args.out and (not dist.is_initialized() or dist.get_rank() == 0):
                    write_report(args.out, rows, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    add_ratios(rows)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print_table(rows)
        if args.out:
            write_report(args.out, rows, torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    return rows


if __name__ == "__main__":
    main()
