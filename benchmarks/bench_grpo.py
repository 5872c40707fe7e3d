"""Mix-GRPO iteration time on one GPU: a sliding 4-step SDE window, the same with flash, and all steps SDE.

One iteration = rollout of G samples (T steps, classifier-free guidance) + learner (every window step, one
AdamW update), through the trainer's own rollout() and transition_loss(); VAE decoding and rewards are left
out (the same for every mode). Prints a table, writes JSON, peak memory beside every time.
Example (one H200, ~3 min): python benchmarks/bench_grpo.py --out grpo.json
`--tiny` runs the same code on CPU with toy sizes (used by the test suite).
"""

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import random_model, write_report  # noqa: E402

from osp_megatron.config.loader import from_dict  # noqa: E402
from osp_megatron.engine.config import TrainConfig  # noqa: E402
from osp_megatron.engine.optim import build_optimizer  # noqa: E402
from osp_megatron.models.config import ModelConfig  # noqa: E402
from osp_megatron.parallel.state import ensure_single_rank_group  # noqa: E402
from osp_megatron.rl.learner import transition_loss  # noqa: E402
from osp_megatron.rl.rollout import rollout, seeded_generator  # noqa: E402
from osp_megatron.rl.schedule import rollout_plan  # noqa: E402


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; the process's peak RSS


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_iteration(model, optimizer, plan, args, device, autocast):
    """(rollout seconds, learner seconds) of one GRPO iteration with this plan."""
    shape = (16, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=generator).expand(args.group, *shape).contiguous().to(device)
    text = torch.randn(args.group, args.text_len, model.model_config.text_dim, generator=generator).to(device)
    null = torch.zeros(1, args.text_len, model.model_config.text_dim, device=device)
    synchronize(device)
    tick = time.perf_counter()
    model.eval()
    batch = rollout(
        model,
        noise,
        text,
        null,
        plan,
        0.7,
        args.guidance,
        [seeded_generator(1, k) for k in range(args.group)],
        autocast,
    )
    synchronize(device)
    rollout_s = time.perf_counter() - tick
    advantages = torch.linspace(-1, 1, args.group, device=device)
    tick = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for first in range(0, args.group, args.micro_batch):
        rows = slice(first, first + args.micro_batch)
        for transition in batch.transitions:
            step = transition_loss(
                model,
                transition.select(rows),
                text[rows],
                null,
                advantages[rows],
                0.7,
                args.guidance,
                1e-4,
                autocast=autocast,
            )
            (step.loss / (len(batch.transitions) * args.group // args.micro_batch)).backward()
    optimizer.step()
    synchronize(device)
    return rollout_s, time.perf_counter() - tick


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (for tests)")
    parser.add_argument("--preset", default="wan-1.3b", choices=["tiny", "wan-1.3b", "wan-14b"])
    parser.add_argument("--frames", type=int, default=17, help="video frames (81 is Wan's 5 s; 17 keeps it ~3 min)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-steps", type=int, default=25, help="T denoising steps")
    parser.add_argument("--window", type=int, default=4, help="SDE steps of the mixed modes")
    parser.add_argument("--window-start", type=int, default=0, help="first SDE step (flash helps most early)")
    parser.add_argument("--flash-stride", type=int, default=2)
    parser.add_argument("--group", type=int, default=4, help="G samples of one prompt")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per learner forward")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="activation checkpointing in the learner (default on)",
    )
    parser.add_argument("--out", default="grpo_bench.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.frames, args.height, args.width = "tiny", 5, 32, 32
        args.num_steps, args.window, args.group, args.text_len = 4, 1, 2, 16
    ensure_single_rank_group()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    config = from_dict(ModelConfig, {"preset": args.preset, "activation_checkpointing": args.checkpointing}, "model")
    model = random_model(config, device, torch.float32)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-6))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    modes = [
        ("mixed (sliding window)", rollout_plan(args.num_steps, args.shift, args.window_start, args.window)),
        (
            "mixed + flash",
            rollout_plan(
                args.num_steps, args.shift, args.window_start, args.window, flash=True, flash_stride=args.flash_stride
            ),
        ),
        ("all steps SDE", rollout_plan(args.num_steps, args.shift, 0, args.num_steps)),
    ]
    warm = rollout_plan(2, args.shift, 0, 1)  # kernels, allocator and autotuning before anything is timed
    one_iteration(model, optimizer, warm, args, device, autocast)
    rows = []
    for name, plan in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rollout_s, learner_s = one_iteration(model, optimizer, plan, args, device, autocast)
        guidance = 1 if args.guidance == 1.0 else 2
        rows.append(
            {
                "mode": name,
                "sde_steps": len(plan.sde_steps),
                "nfe_per_sample": plan.model_evaluations * guidance,
                "rollout_s": rollout_s,
                "learner_s": learner_s,
                "iteration_s": rollout_s + learner_s,
                "peak_mem_gb": peak_memory_gb(device),
            }
        )
    baseline = rows[-1]["iteration_s"]
    for row in rows:
        row["speedup_vs_all_sde"] = baseline / row["iteration_s"]
        row["time_saved_pct"] = 100 * (1 - row["iteration_s"] / baseline)
    print(
        f"{args.preset} {args.frames}x{args.height}x{args.width}, T={args.num_steps}, G={args.group}, "
        f"guidance {args.guidance}, device {device}"
    )
    print(
        f"{'mode':24s} {'SDE':>4s} {'NFE':>5s} {'rollout s':>10s} {'learner s':>10s} {'total s':>9s} "
        f"{'speed-up':>9s} {'saved':>7s} {'peak GB':>8s}"
    )
    for row in rows:
        print(
            f"{row['mode']:24s} {row['sde_steps']:4d} {row['nfe_per_sample']:5d} {row['rollout_s']:10.2f} "
            f"{row['learner_s']:10.2f} {row['iteration_s']:9.2f} {row['speedup_vs_all_sde']:8.2f}x "
            f"{row['time_saved_pct']:6.1f}% {row['peak_mem_gb']:8.2f}"
        )
    write_report(
        args.out,
        rows,
        device,
        preset=args.preset,
        frames=args.frames,
        height=args.height,
        width=args.width,
        num_steps=args.num_steps,
        group=args.group,
        window=args.window,
    )


if __name__ == "__main__":
    main()
