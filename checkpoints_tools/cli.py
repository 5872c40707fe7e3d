"""Command line of osp-ckpt: `import`, `export`, `inspect`, `verify`, `reshard`, `average` and `merge-lora` for
Wan2.1-style DiT checkpoints.

Each subcommand works in a plain process (no torchrun); all but `reshard` read one tensor at a time.
"""

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Convert Wan2.1 / OSP-Next DiT weights to and from this framework's checkpoints, and inspect, check, reshard
and average those (any format, written under any parallel layout).

  osp-ckpt import Wan2.1-T2V-1.3B-Diffusers ckpt/wan13b
  osp-ckpt import Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors ckpt/wan13b
  osp-ckpt export runs/ft/checkpoints/step_00001000 exported/transformer --which ema --dtype bfloat16
  osp-ckpt export runs/ft/checkpoints/step_00001000 exported/wan --format original
  osp-ckpt inspect runs/ft/checkpoints/step_00001000 --tensors
  osp-ckpt verify runs/tiny_t2v/checkpoints/step_00000600
  osp-ckpt reshard runs/ft/checkpoints/step_00001000 resharded/step_00001000 --tensor 2 --data 2 --fsdp
  osp-ckpt average runs/ft/checkpoints/step_0000{0800,0900,1000} averaged/last3
  osp-ckpt merge-lora runs/lora/checkpoints/step_00000500 merged/lora500      # LoRA adapters folded into the base
"""


def _parse_sets(items: list[str]) -> dict:
    from osp_megatron.config.loader import parse_override

    overrides = {}
    for item in items:
        path, value = parse_override(item)
        if path[0] == "model" and len(path) > 1:
            path = path[1:]
        overrides[".".join(path)] = value
    return overrides


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osp-ckpt", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{import,export,inspect,verify,reshard,average,merge-lora}"
    )

    imp = commands.add_parser(
        "import",
        help="published weights -> osp_megatron checkpoint",
        description="Write an osp_megatron checkpoint (step 0, weights only) from a diffusers "
        "WanTransformer3DModel folder (or its pipeline folder), or from an original Wan2.1 / OSP-Next "
        "checkpoint: a .pth/.pt file, a .safetensors file, a *.safetensors.index.json with its shards, "
        "or the folder holding one of those. The layout is detected from the parameter names; the "
        "model size from config.json (diffusers or Wan's own) or else from the weight shapes.",
    )
    imp.add_argument("source", help="diffusers folder, original checkpoint file, index file or folder")
    imp.add_argument("output", help="checkpoint folder to create (DIR/metadata.json, DIR/model/tpRR-of-NN.safetensors)")
    imp.add_argument(
        "--tensor-parallel",
        "-t",
        type=int,
        default=1,
        metavar="N",
        help="write N tensor-parallel shards (the training job's parallel.tensor); any TP size can "
        "load any other, this only saves resharding at load time (default: 1)",
    )
    imp.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the stored weights; training keeps float32 master weights (default: float32)",
    )
    imp.add_argument(
        "--allow-missing",
        action="store_true",
        help="accept model parameters the source lacks (they keep their fresh initialisation)",
    )
    imp.add_argument(
        "--allow-unexpected", action="store_true", help="accept and drop source tensors the model has no parameter for"
    )
    imp.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ModelConfig field for the imported model, repeatable, e.g. --set sparse_ratio=2 for "
        "OSP-Next, or --set num_heads=12 when there is no config.json",
    )
    imp.add_argument(
        "--state-key",
        default=None,
        metavar="KEY",
        help="for .pth files that wrap the weights: the (dotted) key holding the state dict, e.g. "
        "'ema' or 'model'; by default the only wrapper that holds tensors",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    exp = commands.add_parser(
        "export",
        help="osp_megatron checkpoint -> consolidated safetensors (diffusers or Wan2.1 layout)",
        description="Write config.json and consolidated diffusion_pytorch_model*.safetensors: with --format "
        "diffusers (default) loadable by diffusers.WanTransformer3DModel.from_pretrained (use it as the "
        "transformer/ folder of a Wan pipeline), with --format original in Wan2.1's own parameter "
        "names and config. Either loads back with checkpoint.load and osp-sample. Works on checkpoints "
        "written under any parallel layout; tensors are assembled one at a time.",
    )
    exp.add_argument("checkpoint", help="checkpoint folder (an imported one or runs/NAME/checkpoints/step_XXXXXXXX)")
    exp.add_argument("output", help="folder to create")
    exp.add_argument(
        "--which",
        choices=["model", "ema"],
        default="model",
        help="export the raw training weights or their EMA (default: model)",
    )
    exp.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="cast the weights on export (default: keep the stored dtype)",
    )
    exp.add_argument(
        "--format",
        choices=["diffusers", "original"],
        default="diffusers",
        help="parameter names and config.json: diffusers' WanTransformer3DModel or Wan2.1's WanModel "
        "(default: diffusers)",
    )
    exp.add_argument(
        "--max-shard-gb",
        type=float,
        default=10.0,
        help="split the safetensors into files of at most this many GiB, with an index (default: 10)",
    )
    exp.add_argument(
        "--base",
        default=None,
        metavar="PATH",
        help="LoRA checkpoints: where their base weights are now, if they moved (checked against the "
        "fingerprint the checkpoint recorded)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    ins = commands.add_parser(
        "inspect",
        help="print a checkpoint's format, step, parallel layout, model config and tensors",
        description="Describe an osp_megatron checkpoint (format, step, the parallel layout that wrote it, model "
        "config, the model / EMA / optimizer tensors it holds) or a published Wan2.1 checkpoint "
        "(detected layout, model config, missing/unexpected keys).",
    )
    ins.add_argument("path", help="checkpoint folder, diffusers folder or original weight file")
    ins.add_argument("--tensors", action="store_true", help="also list every tensor with its full shape and dtype")
    ins.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ModelConfig field override, as for import",
    )

    ver = commands.add_parser(
        "verify",
        help="check every file of a checkpoint against its manifest (size and CRC-32)",
        description="Offline integrity check: compare each file of a checkpoint folder (or of every checkpoint of "
        "a run folder) with the size and CRC-32 recorded when it was saved. Exit status 0 when intact, "
        "1 when a file is missing, truncated or changed (each named), 2 when PATH is no checkpoint.",
    )
    ver.add_argument("path", help="checkpoint folder (run.dir/checkpoints/step_XXXXXXXX) or a run folder")
    ver.add_argument("--quick", action="store_true", help="compare file sizes only (skips reading the data)")

    res = commands.add_parser(
        "reshard",
        help="rewrite a checkpoint as a run with another parallel layout writes it",
        description="Write OUTPUT as the checkpoint a run with the given layout would have saved: weights, EMA "
        "and optimizer state in the pieces its ranks hold (one file per rank), each rank's state, the "
        "same step. Resuming already reshards any checkpoint on load; this converts ahead of time, or "
        "turns a tensor-parallel safetensors checkpoint (format 1) into the distributed format. Runs "
        "one CPU process per target rank; together they need about the checkpoint's size in memory.",
    )
    res.add_argument("checkpoint", help="checkpoint folder (either format, any layout)")
    res.add_argument("output", help="checkpoint folder to create")
    for name in ("tensor", "data", "ssp", "ulysses"):
        res.add_argument(
            f"--{name}", type=int, default=1, metavar="N", help=f"the target's parallel.{name} (default: 1)"
        )
    res.add_argument("--fsdp", action="store_true", help="the target shards with FSDP (parallel.fsdp=true)")
    res.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    avg = commands.add_parser(
        "average",
        help="element-wise mean of several checkpoints' weights",
        description="Write a weights-only checkpoint whose model (and EMA, where every input has one) weights "
        "are the means of the inputs' (checkpoint averaging, e.g. of the last few saves of a run). "
        "Loads with checkpoint.load, osp-sample and export; as checkpoint.resume it restarts AdamW.",
    )
    avg.add_argument("checkpoints", nargs="+", help="two or more checkpoint folders of one model")
    avg.add_argument("--output", "-o", required=True, help="checkpoint folder to create")
    avg.add_argument(
        "--which",
        nargs="+",
        choices=["model", "ema"],
        default=["model", "ema"],
        help="what to average (default: model ema)",
    )
    avg.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="dtype of the averages (default: the stored dtype)",
    )
    avg.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    merge = commands.add_parser(
        "merge-lora",
        help="fold a LoRA checkpoint's adapters into its base weights",
        description="A LoRA job's checkpoint (osp-train or osp-grpo with a lora: section) stores its adapters and a "
        "reference (path and fingerprint) to the frozen base weights. This writes OUTPUT, a plain "
        "weights-only checkpoint of W + (alpha / rank) B A for every adapted linear (the EMA too when "
        "the checkpoint has one), one tensor at a time; it loads with checkpoint.load and osp-sample "
        "and exports with `osp-ckpt export`. The base must be the one the adapters were trained on.",
    )
    merge.add_argument("checkpoint", help="LoRA checkpoint folder (run.dir/checkpoints/step_XXXXXXXX)")
    merge.add_argument("output", help="checkpoint folder to create")
    merge.add_argument(
        "--base",
        default=None,
        metavar="PATH",
        help="where the base weights are now, if they moved since training (default: the path the checkpoint recorded)",
    )
    merge.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="dtype of the merged weights (default: the base's)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser


def run_verify(args) -> int:
    import time

    from osp_megatron.checkpointing.integrity import find_problems, read_manifest
    from osp_megatron.checkpointing.metadata import is_complete
    from osp_megatron.config.errors import ConfigError

    path = Path(args.path)
    folders = (
        [path]
        if is_complete(path)
        else sorted(p for p in (path / "checkpoints").glob("step_*") if p.is_dir() and is_complete(p))
    )
    if not folders:
        raise ConfigError(f"{str(path)!r} is neither a complete checkpoint nor a run folder holding one")
    damaged = 0
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest is None:
            print(f"{folder}: no manifest (written before checksums were recorded); cannot verify")
            continue
        started = time.time()
        problems = find_problems(folder, check_content=not args.quick)
        size = sum(entry["size"] for entry in manifest["files"].values())
        if problems:
            damaged += 1
            print(f"{folder}: DAMAGED")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(
                f"{folder}: intact ({len(manifest['files'])} files, {size / 2**30:.2f} GiB, "
                f"{'sizes' if args.quick else 'sizes and CRC-32'} checked in {time.time() - started:.1f} s)"
            )
    return 1 if damaged else 0


def run_import(args) -> None:
    from osp_megatron.checkpointing.wan_convert import import_checkpoint

    import_checkpoint(
        args.source,
        args.output,
        tensor_parallel=args.tensor_parallel,
        dtype=args.dtype,
        allow_missing=args.allow_missing,
        allow_unexpected=args.allow_unexpected,
        overrides=_parse_sets(args.sets),
        state_key=args.state_key,
        overwrite=args.overwrite,
        log=print,
    )


def run_export(args) -> None:
    import tempfile

    from osp_megatron.checkpointing.base_weights import lora_metadata
    from osp_megatron.checkpointing.lora_merge import merge_lora_checkpoint
    from osp_megatron.checkpointing.metadata import is_complete
    from osp_megatron.checkpointing.wan_export import export_diffusers

    def export(checkpoint) -> None:
        export_diffusers(
            checkpoint,
            args.output,
            which=args.which,
            dtype=args.dtype,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            overwrite=args.overwrite,
            log=print,
            format=args.format,
        )

    if is_complete(Path(args.checkpoint)) and lora_metadata(args.checkpoint) is not None:
        # Adapters export as the weights they make: folded into their base first.
        with tempfile.TemporaryDirectory(dir=Path(args.output).resolve().parent) as scratch:
            merged = merge_lora_checkpoint(args.checkpoint, Path(scratch) / "merged", base=args.base, log=print)
            export(merged)
        return
    export(args.checkpoint)


def run_inspect(args) -> None:
    from osp_megatron.checkpointing.wan_export import describe

    for line in describe(Path(args.path), _parse_sets(args.sets), tensors=args.tensors):
        print(line)


def run_reshard(args) -> None:
    from osp_megatron.engine.reshard import reshard_checkpoint

    reshard_checkpoint(
        args.checkpoint,
        args.output,
        tensor=args.tensor,
        data=args.data,
        ssp=args.ssp,
        ulysses=args.ulysses,
        fsdp=args.fsdp,
        overwrite=args.overwrite,
        log=print,
    )


def run_average(args) -> None:
    from osp_megatron.checkpointing.transforms import average_checkpoints

    average_checkpoints(
        args.checkpoints, args.output, kinds=tuple(args.which), dtype=args.dtype, overwrite=args.overwrite, log=print
    )


def run_merge_lora(args) -> None:
    import torch

    from osp_megatron.checkpointing.lora_merge import merge_lora_checkpoint

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    merge_lora_checkpoint(
        args.checkpoint, args.output, base=args.base, dtype=dtype, overwrite=args.overwrite, log=print
    )


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    from osp_megatron.config.errors import ConfigError

    try:
        status = {
            "import": run_import,
            "export": run_export,
            "inspect": run_inspect,
            "verify": run_verify,
            "reshard": run_reshard,
            "average": run_average,
            "merge-lora": run_merge_lora,
        }[args.command](args)
    except ConfigError as err:
        print(f"osp-ckpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
