"""Cluster settings of a submission (layout, partition, time limit, environment, preemption), from a YAML file
(`--cluster`, or $OSP_CLUSTER_CONFIG) with command-line flags on top; every key is validated on load.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict, load_yaml

CLUSTER_CONFIG_VARIABLE = "OSP_CLUSTER_CONFIG"

# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_PATTERN = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_minutes(text: str, key: str = "cluster.time") -> int:
    """Slurm time limit text in whole minutes (rounded up), e.g. '1-00:00:00' -> 1440, '90' -> 90."""
    match = _TIME_PATTERN.match(str(text).strip())
    if match is None:
        raise ConfigError(f"{key}: {text!r} is not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS)")
    days, first, second, third = match.groups()
    numbers = [int(n) for n in (first, second, third) if n is not None]
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        hours += 24 * int(days)
    elif len(numbers) == 3:
        hours, minutes, seconds = numbers
    else:  # M or M:S
        hours, (minutes, seconds) = 0, (numbers + [0])[:2]
    total = hours * 60 + minutes + (seconds > 0)
    if total < 1:
        raise ConfigError(f"{key}: the time limit {text!r} is shorter than a minute")
    return total


@dataclass
class ClusterConfig:
    """Where and how a job runs on Slurm; YAML keys are these field names (examples/cluster.yaml)."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # null: one task per GPU (one per node without GPUs)
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, e.g. "0" (all of it) or "500G"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    job_name: str | None = None  # null: the job's name (osp-train, ...)
    exclusive: bool = False
    log_dir: str = "slurm_logs"  # one folder per job id: scripts, per-task logs, flight-recorder dumps
    python: str | None = None  # interpreter on the compute nodes; null: this one (or `python` in a container)
    setup: list[str] = field(default_factory=list)  # shell lines before srun: module load, venv/conda activation
    env: dict = field(default_factory=dict)  # extra environment variables of every task
    container_image: str | None = None  # pyxis/enroot image for srun --container-image
    container_mounts: str | None = None
    sbatch_lines: list[str] = field(default_factory=list)  # extra sbatch options, e.g. "--constraint=h200"
    srun_args: list[str] = field(default_factory=list)  # extra srun options
    # Slurm sends stop_signal this many seconds before the time limit; the job saves and, with requeue, comes back.
    stop_signal: Literal["USR1", "TERM"] = "USR1"
    stop_warning_seconds: int = 300
    requeue: bool = True
    max_requeues: int = 50

    def validate(self, prefix: str = "cluster") -> None:
        for name in ("nodes", "max_requeues"):
            if getattr(self, name) < (1 if name == "nodes" else 0):
                raise ConfigError(
                    f"{prefix}.{name}: must be >= {1 if name == 'nodes' else 0}, got {getattr(self, name)}"
                )
        if self.gpus_per_node < 0:
            raise ConfigError(f"{prefix}.gpus_per_node: must be >= 0, got {self.gpus_per_node}")
        for name in ("tasks_per_node", "cpus_per_task"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1 or null, got {getattr(self, name)}")
        limit = time_limit_minutes(self.time, f"{prefix}.time")
        if not 0 < self.stop_warning_seconds < limit * 60:
            raise ConfigError(
                f"{prefix}.stop_warning_seconds: must be between 0 and the time limit "
                f"({limit * 60} s), got {self.stop_warning_seconds}"
            )
        for name, value in self.env.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(name)):
                raise ConfigError(f"{prefix}.env: {name!r} is not an environment variable name")
            if not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"{prefix}.env.{name}: expected a string, got {value!r}")
        for line in self.sbatch_lines:
            sbatch_option(line, f"{prefix}.sbatch_lines")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


def sbatch_option(line: str, key: str = "cluster.sbatch_lines") -> tuple[str, object]:
    """'--constraint=h200' -> ('constraint', 'h200'); '#SBATCH --exclusive' -> ('exclusive', True)."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH") :].strip()
    match = re.match(r"^--([A-Za-z][A-Za-z0-9-]*)(?:[= ](.+))?$", text)
    if match is None:
        raise ConfigError(f"{key}: {line!r} is not a long sbatch option such as --constraint=h200")
    return match.group(1), (match.group(2).strip() if match.group(2) else True)


def load_cluster_config(path: str | None = None, flags: dict | None = None) -> ClusterConfig:
    """The cluster file (`path`, else $OSP_CLUSTER_CONFIG, else built-in defaults) with `flags` applied on top.

    `flags` maps field names to values given on the command line; list fields are appended to the file's.
    """
    path = path or os.environ.get(CLUSTER_CONFIG_VARIABLE)
    data = load_yaml(Path(path)) if path else {}
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if isinstance(value, list):
            data[name] = list(data.get(name) or []) + value
        elif isinstance(value, dict):
            data[name] = {**(data.get(name) or {}), **value}
        else:
            data[name] = value
    return from_dict(ClusterConfig, data, "cluster")
