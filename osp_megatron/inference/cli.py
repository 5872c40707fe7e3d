"""`osp-sample`: generate .mp4 videos from a training checkpoint (Euler flow sampler, classifier-free guidance).

Example: osp-sample --checkpoint runs/tiny_t2v/checkpoints/step_00000300 --prompt "a red circle moving left"
"""

import argparse
import sys
from pathlib import Path

from osp_megatron.config.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osp-sample",
        description="Sample text-to-video with a DiT checkpoint. The checkpoint's saved job config supplies the "
        "model, VAE and text-encoder settings; flags and sample.* overrides change what is generated.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder (run.dir/checkpoints/step_XXXXXXXX) or a run folder (uses its newest)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text prompt; repeat the flag for several videos (default: the config's sample.prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for classifier-free guidance")
    parser.add_argument("--output", default=None, help="output .mp4 path; a PNG strip of its frames is written beside it (default: outputs/sample.mp4)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: sample.num_steps)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale; 1 disables guidance (default: sample.guidance_scale)")
    parser.add_argument("--shift", type=float, default=None, help="timestep shift (default: sample.shift)")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: sample.seed)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="which weights to use: the EMA copy when the checkpoint has one (default), or the raw ones")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. sample.num_frames=9 model.vae_path=/weights/vae")
    return parser


def _resolve_checkpoint(path: str) -> Path:
    from osp_megatron.checkpointing.checkpoint import is_complete, latest_checkpoint

    folder = Path(path)
    if is_complete(folder):
        return folder
    latest = latest_checkpoint(folder)
    if latest is None:
        raise ConfigError(f"--checkpoint {path!r} is neither a complete checkpoint nor a run folder holding one")
    return latest


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from osp_megatron.utils.logging import quiet_third_party_warnings

    quiet_third_party_warnings()
    try:
        from osp_megatron.checkpointing.checkpoint import load_model_weights, read_metadata
        from osp_megatron.config.job import JobConfig
        from osp_megatron.config.loader import apply_overrides, from_dict
        from osp_megatron.inference.runner import render_sample
        from osp_megatron.models.builder import build_model
        from osp_megatron.parallel.state import ensure_single_rank_group, is_logging_rank

        checkpoint = _resolve_checkpoint(args.checkpoint)
        metadata = read_metadata(checkpoint)
        data = metadata.get("config") or {"model": metadata["model_config"]}
        for key in ("run", "checkpoint"):
            data.pop(key, None)
        # The training run's own sample path is not where an osp-sample video goes (default outputs/sample.mp4).
        (data.get("sample") or {}).pop("output", None)
        flags = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "output": args.output,
                 "num_steps": args.steps, "guidance_scale": args.guidance_scale, "shift": args.shift,
                 "seed": args.seed}
        extra = [f"sample.{k}={v!r}" if isinstance(v, str) else f"sample.{k}={v}"
                 for k, v in flags.items() if v is not None and k != "prompt"]
        apply_overrides(data, extra + list(args.overrides))
        if args.prompt:
            data.setdefault("sample", {})["prompt"] = args.prompt if len(args.prompt) > 1 else args.prompt[0]
        config = from_dict(JobConfig, data)
        device = ensure_single_rank_group()
        model = build_model(config.model, device)
        which = args.weights if (checkpoint / args.weights).is_dir() else "model"
        load_model_weights(checkpoint, model, which=which)
        paths = render_sample(model, config, device, write=is_logging_rank(), progress=True)
    except ConfigError as err:
        print(f"osp-sample: error: {err}", file=sys.stderr)
        return 2
    print(f"[osp-sample] wrote {paths} ({which} weights of {checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
