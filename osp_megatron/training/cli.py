"""`osp-train`: pretrain the DiT from a YAML config plus dotted overrides (torchrun, Slurm or a plain process).

The config is read and checked before torch is imported, so a wrong key fails in well under two seconds.
"""

import sys

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.cli import SAMPLE_RUN_ONLY, JobSpec, job_main

TRAIN_DESCRIPTION = (
    "Train a Wan2.1-style text-to-video DiT with rectified flow on pre-encoded latent shards. "
    "Launch under torchrun or srun for several ranks; a plain process runs one rank."
)
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


def build_trainer(config):
    from osp_megatron.training.trainer import Trainer

    return Trainer(config)


def train_spec() -> JobSpec:
    from osp_megatron.engine.config import JobConfig

    estimate = (
        ("--estimate-memory",),
        dict(
            action="store_true",
            help="print the memory each GPU needs for this config (bytes per parameter, "
            "activations per block, peak) and exit; needs no GPU and starts no process group (docs/memory.md)",
        ),
    )
    return JobSpec(
        "osp-train",
        JobConfig,
        TRAIN_DESCRIPTION,
        EXAMPLES,
        "tiny_t2v.yaml",
        ignored=SAMPLE_RUN_ONLY,
        build=build_trainer,
        extra_arguments=(estimate,),
    )


def main(argv=None) -> int:
    return job_main(train_spec(), argv, actions={"estimate_memory": estimate_memory})


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


if __name__ == "__main__":
    sys.exit(main())
