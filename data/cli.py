"""`osp-data`: prepare training data. build (videos -> clip shards), encode (clips -> latent shards), inspect, bench.

Each subcommand has --help with examples; errors in arguments or inputs exit with status 2 and say what is wrong.
"""

import argparse
import json
import os
import sys

from osp_megatron.config.errors import ConfigError

EXAMPLES = {
    "build": """examples:
  osp-data build --videos raw/ --captions raw/captions.jsonl --output clips/
  osp-data build --videos raw/ --captions captions.csv --output clips/ --buckets 480P,720P --fps 16 --frames 81 \\
      --workers 8 --shard-size-mb 1024
  osp-data build --videos tiny/ --captions tiny.jsonl --output clips/ --buckets 64x64,64x96,96x64 --frames 9

caption file: JSONL ({"path": "a/b.mp4", "caption": "...", "start": 0.0, "end": 12.5, "fps": 30}) or CSV with
the header path,caption[,start,end,fps]. path is relative to --videos; start/end (seconds) limit the video;
fps overrides the container's frame timing. Rerunning the same command resumes a killed build.""",
    "encode": """examples:
  osp-data encode --input clips/ --output latents/ --vae Wan2.1-T2V-1.3B-Diffusers/vae \\
      --text-encoder Wan2.1-T2V-1.3B-Diffusers
  torchrun --nproc-per-node 8 -m osp_data.cli encode --input clips/ --output latents/ --vae ... --text-encoder ...
  osp-data encode --input clips/ --output latents/ --config examples/train_osp_data.yaml   # model.* paths
  osp-data encode --input clips/ --output latents/ --text-dim 32 --text-len 32   # tiny random models (tests)
  osp-data encode --input clips/ --output latents/ --vae ... --text-encoder ... --batch-size 1 \\
      --vae-chunk-frames 40                       # longer VAE chunks: a little faster, twice the GPU memory
  osp-data encode --input clips/ --output latents/ --vae-chunk-frames 0 --no-prefetch   # the reference path

Rerunning the same command resumes: finished shards are kept, the rest are encoded (the --vae-* options and
--no-prefetch may differ between runs: they change the speed, the latents only within rounding). Train with
data.path=latents/.""",
    "inspect": """examples:
  osp-data inspect clips/
  osp-data inspect latents/ --check      # decode every sample and list the bad ones
  osp-data inspect latents/ --json summary.json""",
    "bench": """examples:
  osp-data bench latents/ --micro-batch-size 1 --num-workers 4
  osp-data bench --config examples/train_osp_data.yaml --batches 100     # the config's data.path and batches
  osp-data bench --config examples/train_osp_data.yaml train.global_batch_size=4 data.num_workers=0

With --config the loader reads what osp-train would: the config's data section (data.path, or FOLDER when
given) and batch sizes, after the same dotted overrides. Compare samples/s with the training step: a step of
global_batch_size samples must not wait for data.""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osp-data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prepare training data for osp-train: from a folder of videos and a caption file to bucketed "
        "latent shards.",
        epilog="workflow:\n  osp-data build --videos raw/ --captions captions.jsonl --output clips/\n"
        "  osp-data encode --input clips/ --output latents/ --vae VAE_DIR --text-encoder UMT5_DIR\n"
        "  osp-data inspect latents/ && osp-data bench latents/\n"
        "  osp-train --config examples/train_osp_data.yaml data.path=latents/\n"
        "run `osp-data SUBCOMMAND --help` for each step's options and examples",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def subcommand(name, summary):
        return commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    build = subcommand(
        "build", "cut captioned videos into bucketed clips at a fixed fps and frame count, written as webdataset shards"
    )
    build.add_argument("--videos", required=True, help="folder of video files (searched recursively)")
    build.add_argument("--captions", required=True, help="caption file, .jsonl or .csv (see below)")
    build.add_argument("--output", required=True, help="folder for the clip shards, index.json and build_report.json")
    build.add_argument("--fps", type=float, default=16.0, help="frames per second of the clips (default 16, Wan2.1's)")
    build.add_argument(
        "--frames", type=int, default=81, help="frames per clip, 1 + a multiple of 4 (default 81: 21 latent frames)"
    )
    build.add_argument(
        "--buckets",
        default="480P",
        help="comma-separated buckets: 480P, 720P, 768P (landscape and portrait each) or HxW sizes "
        "(multiples of 16), e.g. 64x64,64x96 (default 480P)",
    )
    build.add_argument(
        "--max-clips-per-video",
        type=int,
        default=0,
        help="cut at most this many consecutive clips from each video; 0 keeps all (default 0)",
    )
    build.add_argument(
        "--shard-size-mb", type=float, default=512.0, help="close a shard once it reaches this size (default 512)"
    )
    build.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="decoding processes; 0 decodes in this process (default min(8, CPUs))",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    encode = subcommand(
        "encode",
        "encode clip shards into Wan VAE latents and umT5 text states (the shards "
        "osp-train reads); one or many ranks under torchrun",
    )
    encode.add_argument("--input", required=True, help="an `osp-data build` output folder")
    encode.add_argument("--output", required=True, help="folder for the latent shards, index.json, encode_report.json")
    encode.add_argument(
        "--config",
        default=None,
        help="an osp-train YAML config: its model.vae_path, model.text_encoder_path, model.text_dim "
        "and model.text_len are used unless given below",
    )
    encode.add_argument(
        "--vae",
        default=None,
        help="local diffusers AutoencoderKLWan folder (or a diffusers model "
        "folder with vae/); default: a tiny random VAE, with a warning",
    )
    encode.add_argument(
        "--text-encoder",
        default=None,
        help="local umT5 folder (or a diffusers model folder with "
        "text_encoder/ and tokenizer/); default: a tiny random encoder, with a warning",
    )
    encode.add_argument("--text-dim", type=int, default=None, help="text state width (default 4096, umT5-XXL)")
    encode.add_argument("--text-len", type=int, default=None, help="maximum caption tokens (default 512)")
    encode.add_argument("--batch-size", type=int, default=2, help="clips per VAE call (one bucket) (default 2)")
    encode.add_argument(
        "--latent-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="storage dtype of latents and text states (default float16: half the bytes)",
    )
    encode.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: this rank's GPU (LOCAL_RANK) when there is one (default auto)",
    )
    encode.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="model dtype; auto is bf16 on GPUs, fp32 on CPU (default auto)",
    )
    encode.add_argument(
        "--vae-chunk-frames",
        type=int,
        default=None,
        help="frames per VAE encoder call after a clip's first frame, a multiple of 4; longer chunks are faster and "
        "take GPU memory in proportion (docs/data.md, 'Encoding speed'); 0 runs diffusers' own encode, 4 frames "
        "a call (default 20, models/vae.py DEFAULT_CHUNK_FRAMES)",
    )
    encode.add_argument(
        "--vae-channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the VAE encoder in the channels-last-3d memory format (same latents; 1.39x against 1.22x without "
        "it at 20-frame chunks on an H100, docs/data.md); default: on GPUs, off on the CPU",
    )
    encode.add_argument(
        "--vae-compile",
        action="store_true",
        help="torch.compile the VAE encoder: one compilation per clip shape and batch size (tens of seconds or "
        "more each), then faster chunks; for long encodes",
    )
    encode.add_argument(
        "--vae-fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused RMS norm + SiLU and no separate padding copy before each causal convolution in the VAE encoder "
        "(same arithmetic; docs/data.md); default: on GPUs, off on the CPU",
    )
    encode.add_argument(
        "--no-prefetch",
        action="store_true",
        help="read, decode and text-encode each batch before the VAE runs, instead of preparing the next batch "
        "in a background thread while the VAE encodes this one",
    )
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")

    inspect = subcommand(
        "inspect", "summarise a clip or latent shard folder: samples per bucket, shapes, dtypes, bad samples"
    )
    inspect.add_argument("folder", help="an `osp-data build` or `osp-data encode` output folder (or any shard folder)")
    inspect.add_argument("--check", action="store_true", help="decode every sample and list the bad ones")
    inspect.add_argument("--json", default=None, help="also write the summary to this JSON file")

    bench = subcommand("bench", "measure the training loader on a latent shard folder: samples/s, MB/s, latency")
    bench.add_argument(
        "folder",
        nargs="?",
        default=None,
        help="a latent shard folder (`osp-data encode` output or "
        "synthetic shards); default: the --config's data.path or data.sources",
    )
    bench.add_argument(
        "--config",
        default=None,
        help="an osp-train YAML config: its data section and batch sizes "
        "are used (data.path is replaced by FOLDER when given)",
    )
    bench.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of the --config file, as osp-train takes them",
    )
    bench.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="samples per micro-batch, one per global "
        "batch (default: the config's train.micro_batch_size and global_batch_size, else 1)",
    )
    bench.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="loader worker processes (default: the config's data.num_workers, else 2)",
    )
    bench.add_argument("--batches", type=int, default=50, help="timed micro-batches (default 50)")
    bench.add_argument("--json", default=None, help="also write the result to this JSON file")
    return parser


def _model_settings(args):
    """VAE / text encoder paths and text shape: flags first, then the --config file's model section."""
    settings = {"vae_path": None, "text_encoder_path": None, "text_dim": 4096, "text_len": 512}
    if args.config:
        from osp_megatron.engine.config import load_job_config

        model = load_job_config(args.config).model
        settings = {key: getattr(model, key) for key in settings}
    for flag, key in (
        ("vae", "vae_path"),
        ("text_encoder", "text_encoder_path"),
        ("text_dim", "text_dim"),
        ("text_len", "text_len"),
    ):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    return settings


def _bench_arguments(args, extra: list[str]) -> None:
    """FOLDER and key=value overrides in any order: argparse gives the first positional to FOLDER and leaves
    overrides after an option unparsed (`extra`)."""
    if args.folder is not None and "=" in args.folder and not os.path.isdir(args.folder):
        args.overrides.insert(0, args.folder)
        args.folder = None
    args.overrides.extend(extra)
    if args.overrides and not args.config:
        raise ConfigError(
            f"key=value overrides ({' '.join(args.overrides)}) change a training config; name it with --config"
        )
    if args.folder is None and not args.config:
        raise ConfigError("name a shard FOLDER, or a training config with --config whose data.path is read")


def _bench_config(args):
    from osp_megatron.data.config import DataConfig
    from osp_megatron.data.shards import read_index

    micro, global_batch = 1, None
    if args.config:
        from osp_megatron.engine.config import load_job_config

        job = load_job_config(args.config, args.overrides)
        config, micro, global_batch = job.data, job.train.micro_batch_size, job.train.global_batch_size
        config.synthetic = False  # measure what is there; osp-train would generate a missing synthetic set
        if args.folder is not None:
            config.sources, config.path = [], args.folder
    else:
        config = DataConfig(path=args.folder, num_workers=2)
        index = read_index(args.folder) or {}
        config.text_dim = index.get("text_dim", config.text_dim)
        config.text_len = index.get("text_len", config.text_len)
        shape = index.get("latent_shape")  # synthetic shards
        if shape:
            config.latent_channels, config.latent_frames, config.latent_height, config.latent_width = shape
    if args.micro_batch_size is not None:
        micro, global_batch = args.micro_batch_size, None
    if args.num_workers is not None:
        config.num_workers = args.num_workers
    return config.validate(), micro, global_batch


def _write_json(path, value):
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "bench" or any("=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from osp_megatron.utils.logging import plain_warnings

    plain_warnings(f"osp-data {args.command}")
    try:
        if args.command == "build":
            from .build import build_dataset

            report = build_dataset(
                args.videos,
                args.captions,
                args.output,
                args.fps,
                args.frames,
                args.buckets,
                args.shard_size_mb,
                args.workers,
                args.max_clips_per_video,
                not args.no_progress,
            )
            return 0 if report["clips"] else 1
        if args.command == "encode":
            from .encode import encode_dataset

            settings = _model_settings(args)
            report = encode_dataset(
                args.input,
                args.output,
                settings["vae_path"],
                settings["text_encoder_path"],
                settings["text_dim"],
                settings["text_len"],
                args.batch_size,
                args.latent_dtype,
                args.device,
                args.precision,
                not args.no_progress,
                **({} if args.vae_chunk_frames is None else {"vae_chunk_frames": args.vae_chunk_frames}),
                vae_channels_last=args.vae_channels_last,
                vae_compile=args.vae_compile,
                vae_fuse=args.vae_fuse,
                prefetch=not args.no_prefetch,
            )
            return 1 if report is not None and not report["samples"] else 0  # the report is rank 0's
        if args.command == "inspect":
            from .inspection import inspect_folder

            _write_json(args.json, inspect_folder(args.folder, args.check))
            return 0
        from .bench import bench_loader

        _bench_arguments(args, extra)
        config, micro, global_batch = _bench_config(args)
        result = bench_loader(config, micro, global_batch, args.batches)
        where = ", ".join(str(path) for path, _ in config.source_list())
        print(
            f"osp-data bench {where}: {result['samples_per_s']} samples/s, {result['mb_per_s']} MB/s, "
            f"batch p50 {result['batch_ms_p50']} ms, p95 {result['batch_ms_p95']} ms ({result['num_workers']} "
            f"workers, micro-batch {micro}, global batch {global_batch or micro}, buckets "
            f"{', '.join(result['buckets'])})"
        )
        _write_json(args.json, result)
        return 0
    except ConfigError as err:
        print(f"osp-data {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
