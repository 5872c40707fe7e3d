"""`osp-eval vbench`: render VBench's prompt suite from a checkpoint, score it, and report Quality/Semantic/Total.

Example: osp-eval vbench --checkpoint runs/wan13b_ft --output-dir eval/wan13b --vbench-cache ~/.cache/vbench
"""

import argparse
import json
import sys
from pathlib import Path

from osp_megatron.config.errors import ConfigError

EXAMPLES = """examples:
  # score per-dimension results you already have (a VBench *_eval_results.json, a folder of them, or a JSON of
  # dimension -> raw score); prints and writes the normalised dimensions, Quality, Semantic and Total
  osp-eval vbench --results my_eval_results.json --output-dir eval/scores

  # render the whole suite (5 videos per prompt) on 8 GPUs, then run VBench from its own environment
  torchrun --nproc_per_node 8 -m osp_megatron.eval.cli vbench --checkpoint ckpt/osp-next-14b \\
      --config examples/sample_wan14b.yaml --output-dir eval/osp14b \\
      --vbench-python /opt/vbench-env/bin/python --vbench-cache /data/vbench_cache

  # a quick look after the tiny main job: 4 prompts in VBench's suite format, 1 video each, on the CPU
  # (temporal flickering needs no weights; without the vbench package subject consistency is reported missing)
  osp-eval vbench --checkpoint runs/tiny_t2v --output-dir runs/eval_tiny --dimensions temporal_flickering \\
      subject_consistency --videos-per-prompt 1 --full-info examples/prompts/vbench_quick.json
"""


def build_parser() -> argparse.ArgumentParser:
    from osp_megatron.eval.vbench_scores import DIMENSIONS
    from osp_megatron.eval.vbench_suite import VIDEOS_PER_PROMPT
    from osp_megatron.inference.cli import add_model_arguments, add_sampler_arguments

    parser = argparse.ArgumentParser(
        prog="osp-eval", description="Evaluate text-to-video models.", epilog="examples: osp-eval vbench --help"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    vbench = commands.add_parser(
        "vbench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        help="VBench: render the prompt suite, score its dimensions, Quality / Semantic / Total",
        description="Render VBench's prompt suite with a checkpoint (--checkpoint; torchrun for several GPUs, "
        "resumable like osp-sample), score the dimensions: temporal_flickering directly, the others with the "
        "`vbench` package and its model weights from --vbench-cache, plus any --results you give; then normalise "
        "and combine them as VBench publishes (docs/evaluation.md). Writes OUTPUT_DIR/vbench_scores.json and "
        "TensorBoard scalars under OUTPUT_DIR/tensorboard.",
    )
    add_model_arguments(vbench, required=False)
    add_sampler_arguments(vbench)
    vbench.add_argument("--output-dir", required=True, help="videos/, records/, vbench/ results, scores")
    vbench.add_argument(
        "--dimensions",
        nargs="+",
        default=list(DIMENSIONS),
        metavar="DIM",
        help=f"dimensions to evaluate (default: all 16): {', '.join(DIMENSIONS)}",
    )
    vbench.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="PATH",
        help="per-dimension raw scores to include: VBench *_eval_results.json, a JSON of "
        "dimension -> score, or a folder of them (repeatable)",
    )
    vbench.add_argument(
        "--videos",
        default=None,
        help="score videos rendered before (a folder of <prompt>-<k>.mp4)"
        " instead of rendering (default: OUTPUT_DIR/videos)",
    )
    vbench.add_argument("--full-info", default=None, help="VBench_full_info.json (default: the vbench package's)")
    vbench.add_argument("--max-prompts", type=int, default=None, help="at most this many prompts per dimension")
    vbench.add_argument(
        "--videos-per-prompt",
        type=int,
        default=VIDEOS_PER_PROMPT,
        help=f"videos of each prompt (VBench's standard suite: {VIDEOS_PER_PROMPT})",
    )
    vbench.add_argument(
        "--vbench-python",
        default=sys.executable,
        help="Python of an environment with `pip install vbench` (default: this one)",
    )
    vbench.add_argument(
        "--vbench-cache",
        default=None,
        help="VBench's model weights (VBENCH_CACHE_DIR); dimensions whose files are missing are "
        "skipped, never downloaded",
    )
    vbench.add_argument("--device", default="cuda", help="device VBench evaluates on (default cuda)")
    vbench.add_argument("--step", type=int, default=0, help="TensorBoard step of the scalars (e.g. training step)")
    return parser


def render_suite(args, dimensions, out: Path) -> bool:
    """Render the suite's videos for `dimensions` (every rank); returns whether this rank should score."""
    from osp_megatron.eval.vbench_suite import find_suite, suite_prompts, suite_specs
    from osp_megatron.inference.cli import flag_settings
    from osp_megatron.inference.jobs import plan_jobs
    from osp_megatron.inference.session import SamplingSession

    suite = find_suite(args.full_info, args.vbench_python)
    specs = suite_specs(suite_prompts(suite, dimensions, args.max_prompts), args.videos_per_prompt)
    settings = flag_settings(args)
    # The suite's specs name every video (<prompt>-<k>) already; VBench's folder holds nothing but the videos.
    settings.update({"sample.videos_per_prompt": 1, "sample.frames": False})
    session = SamplingSession.open(args.checkpoint, args.config, args.overrides, args.weights, settings, "osp-eval")
    jobs = plan_jobs(specs, session.config.sample, str(out / "videos"), record_dir=str(out / "records"))
    session.render(jobs, log_dir=str(out / "logs"), progress=not args.no_progress)
    logging_rank = session.logging_rank
    session.close()
    return logging_rank


def score_videos(args, dimensions, videos: Path, out: Path) -> tuple[dict, list[str]]:
    """Raw scores of `dimensions` over the rendered videos, and notes on what could not be evaluated."""
    from osp_megatron.eval.flickering import temporal_flickering
    from osp_megatron.eval.vbench_scores import read_results
    from osp_megatron.eval.vbench_suite import (
        WITHOUT_WEIGHTS,
        dimension_videos,
        find_suite,
        missing_weights,
        run_vbench,
        vbench_location,
    )

    suite = find_suite(args.full_info, args.vbench_python)
    raw, notes = {}, []
    if "temporal_flickering" in dimensions:
        paths = dimension_videos(suite, videos, "temporal_flickering")
        if paths:
            score, per_video = temporal_flickering(paths)
            raw["temporal_flickering"] = score
            (out / "vbench").mkdir(parents=True, exist_ok=True)
            (out / "vbench" / "temporal_flickering_eval_results.json").write_text(
                json.dumps({"temporal_flickering": [score, per_video]}, indent=2)
            )
        else:
            notes.append(f"temporal_flickering: no videos of its prompts in {videos}")
    others = [d for d in dimensions if d not in WITHOUT_WEIGHTS]
    if not others:
        return raw, notes
    if vbench_location(args.vbench_python) is None:
        notes.append(
            f"{', '.join(others)}: not evaluated, the `vbench` package is not importable by "
            f"{args.vbench_python} (pip install vbench in its own environment and pass --vbench-python; or "
            "give their scores with --results)"
        )
        return raw, notes
    if args.vbench_cache is None:
        notes.append(f"{', '.join(others)}: not evaluated, --vbench-cache (VBench's model weights) is not given")
        return raw, notes
    ready = []
    for dimension in others:
        missing = missing_weights(dimension, args.vbench_cache)
        if missing:
            notes.append(f"{dimension}: not evaluated, missing weights {missing}")
        else:
            ready.append(dimension)
    if ready:
        results = run_vbench(
            args.vbench_python, videos, ready, suite, out / "vbench", args.vbench_cache, args.device, name="osp_eval"
        )
        raw.update(read_results(results))
    return raw, notes


def write_report(report: dict, out: Path, step: int, notes: list[str]) -> None:
    """vbench_scores.json and TensorBoard scalars (vbench/total, vbench/quality, vbench/semantic, per dimension)."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / "vbench_scores.json").write_text(json.dumps({**report, "notes": notes, "step": step}, indent=2))
    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    for key in ("total", "quality", "semantic"):
        if report[key] is not None:
            writer.add_scalar(f"vbench/{key}", report[key], step)
    for dimension, value in report["normalized"].items():
        writer.add_scalar(f"vbench_normalized/{dimension}", value, step)
        writer.add_scalar(f"vbench_raw/{dimension}", report["raw"][dimension], step)
    writer.close()


def format_report(report: dict) -> str:
    lines = [f"{'dimension':<24} {'raw':>8} {'normalised':>11}"]
    for dimension, value in report["normalized"].items():
        lines.append(f"{dimension:<24} {report['raw'][dimension]:>8.4f} {100 * value:>10.2f}%")
    for key in ("quality", "semantic", "total"):
        value = report[key]
        lines.append(
            f"{key.capitalize() + ' score':<24} {'':>8} "
            + (f"{100 * value:>10.2f}%" if value is not None else f"{'n/a':>11}")
        )
    if report["missing"]:
        lines.append(f"missing dimensions: {', '.join(report['missing'])}")
    return "\n".join(lines)


def run_vbench_command(args) -> int:
    from osp_megatron.eval.vbench_scores import read_results, vbench_report
    from osp_megatron.eval.vbench_suite import check_dimensions

    dimensions = check_dimensions(args.dimensions)
    out = Path(args.output_dir)
    raw = {}
    for path in args.results:
        raw.update(read_results(path))
    scoring = True
    if args.checkpoint is not None:
        scoring = render_suite(args, dimensions, out)
    if not scoring:
        return 0
    notes = []
    videos = Path(args.videos) if args.videos is not None else out / "videos"
    if args.checkpoint is not None or args.videos is not None:
        if not videos.is_dir():
            raise ConfigError(f"no videos to score: {str(videos)!r} is not a folder")
        measured, notes = score_videos(args, [d for d in dimensions if d not in raw], videos, out)
        raw.update(measured)
    if not raw:
        raise ConfigError(
            "nothing to score: give --results, or --checkpoint / --videos with dimensions that could "
            "be evaluated" + (f" ({'; '.join(notes)})" if notes else "")
        )
    report = vbench_report(raw)
    write_report(report, out, args.step, notes)
    for note in notes:
        print(f"[osp-eval] {note}")
    print(format_report(report))
    print(f"[osp-eval] wrote {out / 'vbench_scores.json'} and TensorBoard scalars in {out / 'tensorboard'}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from osp_megatron.utils.logging import quiet_third_party_warnings

    quiet_third_party_warnings()
    try:
        return run_vbench_command(args)
    except ConfigError as err:
        print(f"osp-eval: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
