"""`osp-launch`: submit a job to Slurm (one task per GPU), print what would be submitted, or run it locally.

Example: osp-launch --nodes 4 --partition h200 --time 1-00:00:00 osp-train --config my.yaml train.steps=20000
"""

import argparse
import sys

from osp_megatron.config.errors import ConfigError

EXAMPLES = """\
examples:
  osp-launch --dry-run --nodes 2 osp-train --config examples/tiny_t2v.yaml parallel.tensor=2
  osp-launch --cluster examples/cluster.yaml --nodes 4 osp-train --config my.yaml train.steps=20000
  osp-launch --nodes 8 --time 2-00:00:00 --env NCCL_IB_HCA=mlx5 --sbatch=--constraint=h200 osp-grpo --config grpo.yaml
  osp-launch --nodes 1 osp-sample --checkpoint runs/wan --prompt "a red fox in snow" --output fox.mp4
  osp-launch --nodes 2 osp-data encode --config encode.yaml
  osp-launch --local 2 osp-train --config examples/tiny_t2v.yaml parallel.tensor=2   # torchrun here

Cluster defaults come from --cluster FILE (or $OSP_CLUSTER_CONFIG); flags override them. Everything after the
job name is passed to the job unchanged. docs/cluster.md explains the submission, preemption and requeue.
"""


def build_parser() -> argparse.ArgumentParser:
    from .jobs import JOB_MODULES

    parser = argparse.ArgumentParser(
        prog="osp-launch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Run an osp job on a Slurm cluster (one task per GPU through srun, rendezvous on the first "
        "node, a stop signal before the time limit, requeue and resume) or, with --local, under torchrun here.",
    )
    parser.add_argument("job", choices=sorted(JOB_MODULES), help="the job to run")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the job's own arguments (config, overrides)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the layout and the sbatch script, submit nothing")
    mode.add_argument("--local", type=int, metavar="N", help="run N ranks with torchrun on this machine instead")
    slurm = parser.add_argument_group("cluster settings (override the --cluster file)")
    slurm.add_argument("--cluster", metavar="FILE", help="YAML cluster defaults (keys: see examples/cluster.yaml)")
    slurm.add_argument("--nodes", type=int, help="number of nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU (default 8)")
    slurm.add_argument("--tasks-per-node", type=int, help="tasks per node when not one per GPU (CPU jobs)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per task")
    slurm.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--account", help="Slurm account")
    slurm.add_argument("--qos", help="Slurm quality of service")
    slurm.add_argument("--time", help="time limit: MM, HH:MM:SS or D-HH:MM:SS (default 04:00:00)")
    slurm.add_argument("--job-name", help="Slurm job name (default: the job, e.g. osp-train)")
    slurm.add_argument("--log-dir", help="folder for one sub-folder of scripts and logs per job (default slurm_logs)")
    slurm.add_argument("--container-image", help="pyxis/enroot image for every task (srun --container-image)")
    slurm.add_argument("--container-mounts", help="pyxis mounts, e.g. /lustre:/lustre")
    slurm.add_argument("--python", help="Python interpreter on the compute nodes (default: this one)")
    slurm.add_argument(
        "--setup",
        action="append",
        metavar="LINE",
        help="shell line before srun, e.g. 'source /opt/venv/bin/activate' (repeatable)",
    )
    slurm.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment variable (repeatable)")
    slurm.add_argument(
        "--sbatch",
        action="append",
        metavar="OPTION",
        dest="sbatch_lines",
        help="extra sbatch option, e.g. --sbatch=--constraint=h200 (repeatable)",
    )
    slurm.add_argument(
        "--srun", action="append", metavar="OPTION", dest="srun_args", help="extra srun option (repeatable)"
    )
    slurm.add_argument("--stop-signal", choices=["USR1", "TERM"], help="signal Slurm sends before the time limit")
    slurm.add_argument(
        "--stop-warning-seconds", type=int, help="how long before the time limit the stop signal comes (default 300)"
    )
    slurm.add_argument(
        "--no-requeue",
        dest="requeue",
        action="store_false",
        default=None,
        help="after a stop signal, save and end instead of requeueing",
    )
    return parser


def _environment_flags(pairs):
    if not pairs:
        return None
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from osp_megatron.utils.logging import quiet_third_party_warnings

    quiet_third_party_warnings()
    try:
        from .jobs import job_module

        module = job_module(args.job)
        if args.local is not None:
            if args.local < 1:
                raise ConfigError(f"--local {args.local}: the number of ranks must be >= 1")
            from .local import run_local

            return run_local(args.job, module, args.arguments, args.local)

        from .cluster import load_cluster_config
        from .slurm import Submission

        names = (
            "nodes",
            "gpus_per_node",
            "tasks_per_node",
            "cpus_per_task",
            "mem",
            "partition",
            "account",
            "qos",
            "time",
            "job_name",
            "log_dir",
            "container_image",
            "container_mounts",
            "python",
            "setup",
            "sbatch_lines",
            "srun_args",
            "stop_signal",
            "stop_warning_seconds",
            "requeue",
        )
        flags = {name: getattr(args, name) for name in names}
        flags["env"] = _environment_flags(args.env)
        submission = Submission(args.job, module, args.arguments, load_cluster_config(args.cluster, flags))
        if args.dry_run:
            print(submission.describe())
            return 0
        job = submission.submit()
    except ConfigError as err:
        print(f"osp-launch: error: {err}", file=sys.stderr)
        return 2
    folder = submission.folder.parent / str(job.job_id)
    print(
        f"[osp-launch] submitted {args.job} as Slurm job {job.job_id} "
        f"({submission.cluster.world_size} tasks on {submission.cluster.nodes} node(s))"
    )
    print(f"[osp-launch] logs: {folder}/{job.job_id}_0_log.out (rank 0), {folder}/{job.job_id}_<task>_log.err")
    print(f"[osp-launch] follow: tail -f {folder}/{job.job_id}_0_log.out; cancel: scancel {job.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
