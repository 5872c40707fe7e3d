"""`osp-train`: pretrain the DiT from a YAML config plus dotted overrides (torchrun, Slurm or a plain process).

The config is read and checked before torch is imported, so a wrong key fails in well under two seconds.
"""

import argparse
import dataclasses
import sys
import textwrap

from osp_megatron.config.errors import ConfigError

TRAIN_DESCRIPTION = ("Train a Wan2.1-style text-to-video DiT with rectified flow on pre-encoded latent shards. "
                     "Launch under torchrun or srun for several ranks; a plain process runs one rank.")
EXAMPLES = """\
examples:
  osp-train --config examples/tiny_t2v.yaml                       # the CPU demo: data, 600 steps, sample video
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


def config_sections_help(config_class=None) -> str:
    """Every config section with its keys, read off the config dataclasses (default: the training job's)."""
    if config_class is None:
        from osp_megatron.config.job import JobConfig as config_class

    lines = ["config sections and keys (override any as section.key=value; unknown keys are errors):"]
    for section in dataclasses.fields(config_class):
        keys = ", ".join(f.name for f in dataclasses.fields(section.type) if f.init)
        lines.extend(textwrap.wrap(f"{section.name}: {keys}", width=108, initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def build_parser(prog: str = "osp-train", description: str = TRAIN_DESCRIPTION, examples: str = EXAMPLES,
                 config_class=None, default_example: str = "examples/tiny_t2v.yaml") -> argparse.ArgumentParser:
    """The command line every job shares: --config, --print-config and dotted overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=config_sections_help(config_class) + "\n\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", default=None,
                        help=f"YAML config file (default: the packaged tiny CPU example, {default_example})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (after overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def packaged_config(name: str = "tiny_t2v.yaml"):
    from importlib import resources

    return resources.files("osp_megatron") / "configs" / name


def default_config_path():
    return packaged_config("tiny_t2v.yaml")


def job_main(argv, parser: argparse.ArgumentParser, load_config, default_config, job: str = "osp-train",
             build_trainer=None, summary=None) -> int:
    """Parse, load and check the config (before torch is imported), print it or run the job."""
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config or default_config, args.overrides)
    except ConfigError as err:
        print(f"{job}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from osp_megatron.config.loader import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    if getattr(args, "estimate_memory", False):
        return estimate_memory(config, job)
    return run(config, job, build_trainer, summary)


def main(argv=None) -> int:
    from osp_megatron.config.job import load_job_config

    parser = build_parser()
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print the memory each GPU needs for this config (bytes per parameter, activations "
                        "per block, peak) and exit; needs no GPU and starts no process group (docs/memory.md)")
    return job_main(argv, parser, load_job_config, default_config_path())


def estimate_memory(config, job: str = "osp-train") -> int:
    from osp_megatron.training.memory import estimate_config
    from osp_megatron.utils.logging import plain_warnings

    plain_warnings(job)
    try:
        print(estimate_config(config))
    except ConfigError as err:
        print(f"{job}: error: {err}", file=sys.stderr)
        return 2
    return 0


def run(config, job: str = "osp-train", build_trainer=None, summary=None) -> int:
    """Build and train under graceful-stop signal handling; exit status 0 also when stopped by a signal.

    build_trainer(config) -> an object with train(stop) and logging_rank (default: the pretraining Trainer);
    summary(result) -> the text after "finished at step N" (default: the loss).
    """
    from osp_megatron.training.signals import GracefulStop
    from osp_megatron.utils.logging import plain_warnings

    plain_warnings(job)
    with GracefulStop(job=job) as stop:
        trainer = None
        try:
            if build_trainer is None:
                from osp_megatron.training.trainer import Trainer as build_trainer
            trainer = build_trainer(config)
            result = trainer.train(stop)
        except ConfigError as err:
            print(f"{job}: error: {err}", file=sys.stderr)
            return 2
        finally:
            from osp_megatron.parallel.state import destroy_distributed

            destroy_distributed()
    if trainer.logging_rank and result["status"] == "finished":
        text = summary(result) if summary is not None else f"loss {result['loss']:.4f}"
        print(f"[{job}] finished at step {result['step']} ({text})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
