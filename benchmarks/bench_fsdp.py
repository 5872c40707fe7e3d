"""FSDP through osp-train on one node: wan-14b (40 blocks) trains on two GPUs; wan-1.3b scales against one GPU.

Every case is a real `osp-train` job under torchrun on synthetic shards of the case's latent shape; the table
(and JSON) gives per-step time, throughput, model TFLOP/s per GPU and peak memory from its metrics.jsonl.
Example (2 H200): python benchmarks/bench_fsdp.py --out fsdp.json
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_t2v.yaml"

# Latent (T, H, W) of 81 frames through the Wan VAE (stride 4 x 8 x 8): 480x832 and 720x1280 pixels.
LATENTS = {"480P": (21, 60, 104), "720P": (21, 90, 160), "tiny": (3, 16, 16)}

# name -> (GPUs, model preset, resolution, parallel + train overrides, steps). The 14B cases keep the EMA in
# host memory (20 -> 16 bytes per parameter on the GPUs) and recompute every block in backward.
CASES = {
    "wan14b_480p_fsdp_ssp2": (
        2,
        "wan-14b",
        "480P",
        ["parallel.ssp=2", "parallel.fsdp=true", "train.ema_device=cpu", "checkpointing"],
        10,
    ),
    "wan14b_720p_fsdp_ssp2": (
        2,
        "wan-14b",
        "720P",
        ["parallel.ssp=2", "parallel.fsdp=true", "train.ema_device=cpu", "checkpointing"],
        4,
    ),
    # If the 480P case runs out of GPU memory: shards in host memory, optimizer step on the CPU, no EMA.
    "wan14b_480p_fsdp_ssp2_offload": (
        2,
        "wan-14b",
        "480P",
        ["parallel.ssp=2", "parallel.fsdp=true", "parallel.fsdp_offload=true", "train.ema_decay=0", "checkpointing"],
        6,
    ),
    "wan13b_480p_1gpu": (1, "wan-1.3b", "480P", [], 12),
    "wan13b_480p_fsdp_ssp2": (2, "wan-1.3b", "480P", ["parallel.ssp=2", "parallel.fsdp=true"], 12),
    "wan13b_480p_fsdp_data2": (2, "wan-1.3b", "480P", ["parallel.fsdp=true"], 12),
}
DEFAULT_CASES = ["wan14b_480p_fsdp_ssp2", "wan13b_480p_1gpu", "wan13b_480p_fsdp_ssp2", "wan13b_480p_fsdp_data2"]
# wan-1.3b on two GPUs against one: samples/s over the one-GPU case's (target >= 1.85).
SCALING = {"wan13b_480p_fsdp_ssp2": "wan13b_480p_1gpu", "wan13b_480p_fsdp_data2": "wan13b_480p_1gpu"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Run osp-train under torchrun for each case (FSDP with SSP=2 or data=2 on 2 GPUs, wan-1.3b on "
        "1 GPU) on synthetic shards, and tabulate step time, samples/s, model TFLOP/s per GPU, peak "
        "memory (max over ranks) and the loss of the first and last step.",
        epilog="cases: " + ", ".join(CASES) + f"; default: {' '.join(DEFAULT_CASES)}",
    )
    parser.add_argument("--cases", nargs="+", default=None, choices=list(CASES), help="cases to run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timings (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per case (default: the case's own)")
    parser.add_argument("--work", default="/tmp/bench_fsdp", help="run folders and synthetic shards go here")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny model on CPU ranks (gloo), 3 steps: checks the plumbing in seconds",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    return parser.parse_args(argv)


def activation_checkpointing_value() -> str:
    """model.activation_checkpointing's value for 'recompute every block' in this version of the config."""
    import typing

    from osp_megatron.models.config import ModelConfig

    kind = typing.get_type_hints(ModelConfig)["activation_checkpointing"]
    return "true" if kind is bool else "full"


def case_overrides(name: str, args, run_dir: Path, data_dir: Path) -> tuple[int, list[str]]:
    gpus, preset, resolution, extra, steps = CASES[name]
    steps = args.steps or (3 if args.tiny else steps)
    latent = LATENTS["tiny" if args.tiny else resolution]
    data = gpus // (2 if "parallel.ssp=2" in extra else 1)
    # One synthetic set per resolution serves every case (at most two samples per step), so its size is fixed.
    samples = max(32, 2 * steps + 4)
    overrides = [
        f"run.dir={run_dir}",
        "checkpoint.resume=none",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "train.sample_at_end=false",
        "train.progress=false",
        f"train.steps={steps}",
        "train.micro_batch_size=1",
        f"train.global_batch_size={data}",
        "train.warmup_steps=0",
        "train.lr=1e-5",
        "train.min_lr=0",
        "train.ema_decay=0.9999",
        f"model.preset={'tiny' if args.tiny else preset}",
        "model.sparse_ratio=2",
        "model.vae=tiny-random",
        "train.eval_interval=0",
        f"data.path={data_dir / ('tiny' if args.tiny else resolution)}",
        "data.synthetic=true",
        f"data.synthetic_num_samples={samples}",
        f"data.synthetic_samples_per_shard={samples}",
        f"data.latent_frames={latent[0]}",
        f"data.latent_height={latent[1]}",
        f"data.latent_width={latent[2]}",
    ]
    if not args.tiny:
        overrides.append("model.full_blocks=4")  # OSP-Next's 1:4 hybrid: 4 full blocks at each end
    for item in extra:
        overrides.append(
            f"model.activation_checkpointing={activation_checkpointing_value()}" if item == "checkpointing" else item
        )
    if args.tiny:
        overrides += ["train.device=cpu", "model.full_blocks=1"]
    return gpus, overrides


def run_case(name: str, args) -> dict:
    work = Path(args.work)
    run_dir = work / name
    gpus, overrides = case_overrides(name, args, run_dir, work / "data")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "osp_megatron.training.cli",
        "--config",
        str(EXAMPLE),
        *overrides,
    ]
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"),
        # torchrun would give each rank one thread; the EMA's host-memory update wants the rank's cores.
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // gpus)),
    )
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - started
    row = {
        "case": name,
        "gpus": gpus,
        "command": " ".join(command[2:]),
        "wall_s": round(wall, 1),
        "exit_code": result.returncode,
    }
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "loss" in r]
    if result.returncode != 0 or not rows:
        row["error"] = (result.stdout + result.stderr)[-3000:]
        return row
    timed = rows[args.warmup :] or rows[-1:]
    step_s = statistics.median(r["step_time_s"] for r in timed)
    row.update(
        steps=len(rows),
        step_s=round(step_s, 3),
        samples_per_s=round(statistics.median(r["samples_per_s"] for r in timed), 4),
        tflops_per_gpu=round(statistics.median(r["tflops"] for r in timed), 1),
        loss_first=rows[0]["loss"],
        loss_last=rows[-1]["loss"],
        loss_finite=all(math.isfinite(r["loss"]) for r in rows),
        peak_gib=round(max(r.get("mem_peak_gib", r.get("mem_rss_gib", 0.0)) for r in rows), 2),
        reserved_gib=round(max(r.get("mem_reserved_gib", 0.0) for r in rows), 2),
    )
    return row


def print_table(rows: list[dict]) -> None:
    header = (
        "case",
        "GPUs",
        "s/step",
        "samples/s",
        "TFLOP/s/GPU",
        "peak GiB",
        "reserved GiB",
        "loss 1st->last",
        "speed-up",
    )
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append((row["case"], str(row["gpus"]), f"failed (exit {row['exit_code']})", "", "", "", "", "", ""))
            continue
        lines.append(
            (
                row["case"],
                str(row["gpus"]),
                f"{row['step_s']:.3f}",
                f"{row['samples_per_s']:.3f}",
                f"{row['tflops_per_gpu']:.1f}",
                f"{row['peak_gib']:.2f}",
                f"{row['reserved_gib']:.2f}",
                f"{row['loss_first']:.4f}->{row['loss_last']:.4f}",
                f"{row['speedup']:.2f}x" if "speedup" in row else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.cases or DEFAULT_CASES
    rows = []
    for name in names:
        print(f"[bench_fsdp] {name} ...", flush=True)
        rows.append(run_case(name, args))
        if "error" in rows[-1]:
            print(rows[-1]["error"], file=sys.stderr)
    by_name = {row["case"]: row for row in rows}
    for name, baseline in SCALING.items():
        if name in by_name and baseline in by_name and "error" not in by_name[name] | by_name[baseline]:
            by_name[name]["speedup"] = round(by_name[name]["samples_per_s"] / by_name[baseline]["samples_per_s"], 3)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"date": str(date.today()), "tiny": args.tiny, "rows": rows}, indent=2))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
