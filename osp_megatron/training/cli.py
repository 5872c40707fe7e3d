"""`osp-train`: pretrain the DiT from a YAML config plus dotted overrides (torchrun, Slurm or a plain process).

The config is read and checked before torch is imported, so a wrong key fails in well under two seconds.
"""

import argparse
import dataclasses
import sys
import textwrap

from osp_megatron.config.errors import ConfigError

EXAMPLES = """\
examples:
  osp-train --config examples/tiny_t2v.yaml                       # the CPU demo: data, 300 steps, sample video
  osp-train --config examples/tiny_t2v.yaml train.steps=50 run.dir=runs/try model.sparse_ratio=2
  osp-train --config examples/tiny_t2v.yaml --print-config        # the resolved config as YAML
  torchrun --nproc_per_node 2 -m osp_megatron.training.cli --config examples/tiny_t2v.yaml \\
      parallel.tensor=2 run.dir=runs/tiny_tp2                     # several ranks (also: launch/, Slurm)
  osp-train --config my.yaml checkpoint.resume=runs/x/checkpoints/step_00000200   # resume a given checkpoint

resume: checkpoint.resume=auto (the default) continues from the newest intact checkpoint in
  run.dir/checkpoints, skipping damaged ones; running the same command again after a stop or crash continues
  where it stopped, and a finished run says so and exits. Ctrl-C, SIGTERM or SIGUSR1 finish the current step,
  save a checkpoint and exit 0 (a second Ctrl-C exits at once).

outputs (under run.dir): checkpoints/step_N/ (+ latest), metrics.jsonl (one line per step),
  tensorboard/ (tensorboard --logdir RUN_DIR/tensorboard), samples/*.mp4 with a .png frame strip beside each,
  config.yaml (the resolved config). sample.output, when set, is where the final sample video goes.
"""


def config_sections_help() -> str:
    """Every config section with its keys, read off the config dataclasses."""
    from osp_megatron.config.job import JobConfig

    lines = ["config sections and keys (override any as section.key=value; unknown keys are errors):"]
    for section in dataclasses.fields(JobConfig):
        keys = ", ".join(f.name for f in dataclasses.fields(section.type) if f.init)
        lines.extend(textwrap.wrap(f"{section.name}: {keys}", width=108, initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osp-train",
        description="Train a Wan2.1-style text-to-video DiT with rectified flow on pre-encoded latent shards. "
        "Launch under torchrun or srun for several ranks; a plain process runs one rank.",
        epilog=config_sections_help() + "\n\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    try:
        from osp_megatron.config.job import load_job_config

        config = load_job_config(args.config or default_config_path(), args.overrides)
    except ConfigError as err:
        print(f"osp-train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from osp_megatron.config.loader import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    if args.estimate_memory:
        return estimate_memory(config)
    return run(config)


def estimate_memory(config) -> int:
    from osp_megatron.training.memory import estimate_config
    from osp_megatron.utils.logging import quiet_third_party_warnings

    quiet_third_party_warnings()
    try:
        print(estimate_config(config))
    except ConfigError as err:
        print(f"osp-train: error: {err}", file=sys.stderr)
        return 2
    return 0


def run(config) -> int:
    """Train under graceful-stop signal handling; exit status 0 also when stopped by a signal."""
    from osp_megatron.training.signals import GracefulStop
    from osp_megatron.utils.logging import quiet_third_party_warnings

    quiet_third_party_warnings()
    with GracefulStop(job="osp-train") as stop:
        trainer = None
        try:
            from osp_megatron.training.trainer import Trainer

            trainer = Trainer(config)
            result = trainer.train(stop)
        except ConfigError as err:
            print(f"osp-train: error: {err}", file=sys.stderr)
            return 2
        finally:
            from osp_megatron.parallel.state import destroy_distributed

            destroy_distributed()
    if trainer.logging_rank and result["status"] == "finished":
        print(f"[osp-train] finished at step {result['step']} (loss {result['loss']:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
