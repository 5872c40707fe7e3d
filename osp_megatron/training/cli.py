"""`osp-train`: pretrain the DiT from a YAML config plus dotted overrides (torchrun, Slurm or a plain process).

Example: osp-train --config examples/tiny_t2v.yaml train.steps=50 run.dir=runs/try
"""

import argparse
import sys

from osp_megatron.config.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osp-train",
        description="Train a Wan2.1-style text-to-video DiT with rectified flow. Launch under torchrun or "
        "srun for several ranks; a plain process runs one rank.",
        epilog="Any config key can be overridden as section.key=value, e.g. model.num_layers=8 "
        "parallel.tensor=2 checkpoint.resume=none. Unknown keys are errors.",
    )
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config file (default: the packaged tiny CPU example, examples/tiny_t2v.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (after overrides) as YAML and exit")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print the memory each GPU needs for this config (bytes per parameter, activations "
                        "per block, peak) and exit; needs no GPU and starts no process group (docs/memory.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def default_config_path():
    from importlib import resources

    return resources.files("osp_megatron") / "configs" / "tiny_t2v.yaml"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from osp_megatron.utils.logging import quiet_third_party_warnings

    quiet_third_party_warnings()
    try:
        import yaml

        from osp_megatron.config.job import load_job_config
        from osp_megatron.config.loader import to_dict

        config = load_job_config(args.config or default_config_path(), args.overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(config), sort_keys=False))
            return 0
        if args.estimate_memory:
            from osp_megatron.training.memory import estimate_config

            print(estimate_config(config))
            return 0
        from osp_megatron.training.trainer import Trainer

        trainer = Trainer(config)
        result = trainer.train()
    except ConfigError as err:
        print(f"osp-train: error: {err}", file=sys.stderr)
        return 2
    finally:
        from osp_megatron.parallel.state import destroy_distributed

        destroy_distributed()
    if trainer.logging_rank and "loss" in result:
        print(f"[osp-train] finished at step {result['step']} (loss {result['loss']:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
