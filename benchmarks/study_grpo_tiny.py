"""Does the tiny GRPO default raise its evaluation reward? Runs it from one pretraining for several seeds and
with shuffled rewards (the control), and tabulates eval_reward before and after each run (docs/grpo.md).

Example (2-core CPU, two runs at a time with one thread each, ~15 min for three seeds and three controls):
    python benchmarks/study_grpo_tiny.py --pretrain runs/tiny_t2v --runs-dir runs/study_cpu --out study_cpu.json
Arguments after the options are overrides for every run (`train.lr=1e-4 grpo.window_size=3`). A run folder that
already holds a finished run is read, not run again: give every recipe its own --runs-dir.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_report  # noqa: E402

from osp_megatron.engine.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The last line of a finished osp-grpo run.
FINISHED = re.compile(r"evaluation reward [\d.]+ -> [\d.]+ after \d+ iterations")


def run_name(seed: int, shuffled: bool) -> str:
    return f"seed{seed}_shuffled" if shuffled else f"seed{seed}"


def launch(config: Path, pretrain: Path, run_dir: Path, seed: int, shuffled: bool, overrides: list[str]) -> float:
    """One osp-grpo run as a subprocess (its output in run_dir.log); returns its wall seconds."""
    command = [
        sys.executable,
        "-m",
        "osp_megatron.rl.cli",
        "--config",
        str(config),
        f"run.dir={run_dir}",
        f"checkpoint.load={pretrain}",
        f"train.seed={seed}",
        f"grpo.shuffle_rewards={str(shuffled).lower()}",
        "grpo.pretrain_if_missing=null",
        "train.progress=false",
        "train.sample_at_end=false",
        *overrides,
    ]
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        result = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
    if result.returncode:
        raise SystemExit(f"{run_dir.name} failed (exit {result.returncode}); see {run_dir.with_suffix('.log')}")
    return time.perf_counter() - started


def evaluations(run_dir: Path) -> dict[int, float]:
    """eval_reward by iteration from a run's metrics.jsonl (iteration 0: before training)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {row["step"]: row["eval_reward"] for row in read_metrics(path) if "eval_reward" in row}


def finished(run_dir: Path) -> bool:
    """Whether the run's log ends with the job's final message ("evaluation reward A -> B after N iterations");
    an unfinished run is launched again and resumes from its newest checkpoint."""
    log = run_dir.with_suffix(".log")
    return log.is_file() and FINISHED.search(log.read_text()) is not None


def study(args, overrides: list[str]) -> list[dict]:
    runs_dir = Path(args.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    pretrain, config = Path(args.pretrain).resolve(), Path(args.config).resolve()
    plan = [(seed, False) for seed in args.seeds] + [(seed, True) for seed in args.control_seeds]

    def one(entry) -> dict:
        seed, shuffled = entry
        run_dir = runs_dir / run_name(seed, shuffled)
        seconds = None if finished(run_dir) else launch(config, pretrain, run_dir, seed, shuffled, overrides)
        curve = evaluations(run_dir)
        before, after = curve[min(curve)], curve[max(curve)]
        print(f"{run_dir.name}: eval_reward {before:.4f} -> {after:.4f}", flush=True)
        return {
            "seed": seed,
            "shuffled": shuffled,
            "run_dir": str(run_dir),
            "eval_reward": curve,
            "before": before,
            "after": after,
            "change": after - before,
            "seconds": seconds,
        }

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(one, plan))


def summary(rows: list[dict]) -> dict:
    result = {}
    for shuffled, name in ((False, "real"), (True, "shuffled")):
        changes = [row["change"] for row in rows if row["shuffled"] == shuffled]
        if changes:
            result[name] = {
                "runs": len(changes),
                "mean_change": statistics.mean(changes),
                "min_change": min(changes),
                "max_change": max(changes),
            }
    return result


def table(rows: list[dict], label: str) -> str:
    steps = sorted({step for row in rows for step in row["eval_reward"]})
    head = f"| {label} | " + " | ".join(f"eval {step}" for step in steps) + " | change | minutes |"
    lines = [head, "|" + "---|" * (len(steps) + 3)]
    for row in rows:
        name = f"seed {row['seed']}" + (", shuffled" if row["shuffled"] else "")
        values = " | ".join(f"{row['eval_reward'][step]:.3f}" if step in row["eval_reward"] else "" for step in steps)
        minutes = f"{row['seconds'] / 60:.1f}" if row["seconds"] is not None else ""
        lines.append(f"| {name} | {values} | {row['change']:+.3f} | {minutes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrain",
        required=True,
        help="checkpoint.load of every run: a pretraining run folder "
        "or checkpoint (make one with osp-train --config examples/tiny_t2v.yaml run.dir=...)",
    )
    parser.add_argument("--runs-dir", required=True, help="folder for the run folders and their logs")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--label", default="", help="name of the pretraining in the table (default: --pretrain)")
    parser.add_argument("--config", default=str(ROOT / "examples" / "grpo_tiny.yaml"), help="the GRPO config")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1234, 7, 8], help="train.seed of the real runs")
    parser.add_argument(
        "--control-seeds",
        type=int,
        nargs="*",
        default=[1234, 7, 8],
        help="train.seed of the runs with grpo.shuffle_rewards=true",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each as train.cpu_threads says)")
    args, overrides = parser.parse_known_args()
    unknown = [item for item in overrides if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"not an option or a key=value override: {' '.join(unknown)}")
    if not Path(args.pretrain).exists():
        parser.error(f"--pretrain {args.pretrain} does not exist")
    rows = study(args, overrides)
    report = write_report(
        args.out,
        rows,
        torch.device("cpu"),
        pretrain=str(Path(args.pretrain).resolve()),
        config=args.config,
        overrides=overrides,
        summary=summary(rows),
    )
    print(table(rows, args.label or args.pretrain))
    for name, values in report["summary"].items():
        print(
            f"{name}: {values['runs']} runs, mean change {values['mean_change']:+.4f} "
            f"(min {values['min_change']:+.4f}, max {values['max_change']:+.4f})"
        )


if __name__ == "__main__":
    main()
