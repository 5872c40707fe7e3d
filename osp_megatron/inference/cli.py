"""`osp-sample`: render videos from a checkpoint for one prompt or a prompt file, on one device or many ranks.

Example: osp-sample --checkpoint runs/tiny_t2v --prompt "a red circle moving left" --output red.mp4
"""

import argparse
import sys

from osp_megatron.config.errors import ConfigError

EXAMPLES = """examples:
  # one video from the newest checkpoint of a training run (its saved config gives model, VAE and encoder)
  osp-sample --checkpoint runs/tiny_t2v --prompt "a red circle moving left" --output red.mp4

  # a prompt file into a folder, 2 videos per prompt, UniPC 50 steps; rerun the same command to resume
  osp-sample --checkpoint runs/tiny_t2v --prompt-file examples/prompts/tiny.txt --output-dir outputs/tiny \\
      --videos-per-prompt 2 --sampler unipc --steps 50

  # published Wan2.1 weights (diffusers download: DiT, VAE and umT5 in one folder), Skiparse blocks
  osp-sample --checkpoint weights/Wan2.1-T2V-1.3B-Diffusers --prompt-file prompts.jsonl --output-dir out \\
      model.sparse_ratio=2

  # 8 GPUs: one video over SSP x 2 ranks, CFG halves on 2 ranks, 2 replicas rendering different prompts
  torchrun --nproc_per_node 8 -m osp_megatron.inference.cli --checkpoint ckpt/osp-next-14b \\
      --config examples/sample_wan14b.yaml --prompt-file prompts.txt --output-dir out parallel.ssp=2 \\
      sample.cfg_parallel=true
"""

# flag -> sample.<key>
_SAMPLE_FLAGS = {
    "negative_prompt": "negative_prompt",
    "output": "output",
    "output_dir": "output_dir",
    "prompt_file": "prompt_file",
    "steps": "num_steps",
    "guidance_scale": "guidance_scale",
    "shift": "shift",
    "seed": "seed",
    "sampler": "sampler",
    "num_frames": "num_frames",
    "height": "height",
    "width": "width",
    "fps": "fps",
    "batch_size": "batch_size",
    "videos_per_prompt": "videos_per_prompt",
    "precision": "precision",
}


def add_model_arguments(parser, required: bool = True) -> None:
    """Flags saying what renders: weights, config, encoders, precision, CFG parallelism, dotted overrides."""
    parser.add_argument(
        "--checkpoint",
        required=required,
        help="weights: checkpoint or run folder, diffusers folder, or original Wan2.1 file/folder",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file merged over the checkpoint's config (sample:, model:, parallel: sections)",
    )
    parser.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="framework checkpoints: the EMA copy when there is one (default) or the raw weights",
    )
    parser.add_argument("--vae", default=None, help="local AutoencoderKLWan folder (sets model.vae_path)")
    parser.add_argument("--text-encoder", default=None, help="local umT5 folder (sets model.text_encoder_path)")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="weights' dtype for sampling (auto: bf16 on GPUs, fp32 on CPU)",
    )
    parser.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="conditional and unconditional passes on two data-parallel ranks (needs an even count)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no console progress bars")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. sample.num_frames=9 model.sparse_ratio=2 parallel.ssp=2",
    )


def add_sampler_arguments(parser) -> None:
    """Flags saying how each video is sampled (sample.* keys)."""
    parser.add_argument(
        "--sampler",
        choices=["euler", "unipc"],
        default=None,
        help="flow-matching sampler (default: sample.sampler, unipc)",
    )
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: sample.num_steps)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale; 1 disables guidance (default: sample.guidance_scale)",
    )
    parser.add_argument("--shift", type=float, default=None, help="timestep shift (default: sample.shift)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first video; video i gets seed + i")
    parser.add_argument("--num-frames", type=int, default=None, help="frames, 1 + a multiple of 4 (e.g. 81)")
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16")
    parser.add_argument("--fps", type=int, default=None, help="frames per second of the written .mp4")
    parser.add_argument("--batch-size", type=int, default=None, help="videos denoised together per model replica")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osp-sample",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Render text-to-video samples. --checkpoint takes a framework checkpoint (or a run folder: its "
        "newest), a diffusers Wan2.1 folder or original Wan2.1 weights. Flags set sample.* keys; any config key can "
        "be given as a dotted override (model.sparse_ratio=2, parallel.ssp=2, sample.cfg_parallel=true). With a "
        "prompt file every video gets a .json record (prompt, seed, settings) and a .png strip beside it; a rerun "
        "skips videos that have a record. Run under torchrun for several GPUs (docs/inference.md).",
    )
    add_model_arguments(parser)
    add_sampler_arguments(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text prompt; repeat for several (default: the config's sample.prompt)",
    )
    parser.add_argument(
        "--prompt-file",
        default=None,
        help=".txt (one prompt a line) or .jsonl (prompt, "
        "negative_prompt, seed, num_frames, height, width, name per line)",
    )
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for classifier-free guidance")
    parser.add_argument(
        "--output",
        default=None,
        help="the .mp4 path of a single video; a PNG strip of its frames "
        "is written beside it (default: outputs/sample.mp4)",
    )
    parser.add_argument("--output-dir", default=None, help="folder for many videos, named <index>-<prompt>.mp4")
    parser.add_argument("--videos-per-prompt", type=int, default=None, help="videos of each prompt (seeds differ)")
    parser.add_argument("--frames", action="store_true", help="also write every frame as a PNG")
    return parser


def flag_settings(args) -> dict:
    """The flags as {dotted key: value}; dotted overrides on the command line are applied after them."""
    settings = {
        f"sample.{key}": getattr(args, flag)
        for flag, key in _SAMPLE_FLAGS.items()
        if getattr(args, flag, None) is not None
    }
    if getattr(args, "frames", False):
        settings["sample.frames"] = True
    if args.cfg_parallel:
        settings["sample.cfg_parallel"] = True
    if args.vae is not None:
        settings["model.vae_path"] = args.vae
    if args.text_encoder is not None:
        settings["model.text_encoder_path"] = args.text_encoder
    if getattr(args, "prompt", None):
        settings["sample.prompt"] = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    return settings


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from osp_megatron.utils.logging import quiet_third_party_warnings

    quiet_third_party_warnings()
    try:
        from osp_megatron.inference.jobs import DEFAULT_OUTPUT
        from osp_megatron.inference.session import SamplingSession

        session = SamplingSession.open(args.checkpoint, args.config, args.overrides, args.weights, flag_settings(args))
        rendered, skipped = session.render(session.jobs(), progress=not args.no_progress)
        logging_rank = session.logging_rank
        session.close()
    except ConfigError as err:
        print(f"osp-sample: error: {err}", file=sys.stderr)
        return 2
    if logging_rank:
        where = session.config.sample.output_dir or session.config.sample.output or DEFAULT_OUTPUT
        print(
            f"[osp-sample] rendered {rendered} video(s) on replica 0, {skipped} already done -> {where} "
            f"({session.which} weights of {session.weights})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
