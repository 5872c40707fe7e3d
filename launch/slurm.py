"""A job plus cluster settings as a Slurm submission through submitit: the sbatch script (one task per GPU
through srun, stop signal before the time limit, requeue), the pickled task, the job id and log paths.
"""

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel.diagnostics import COMMUNICATION_DEFAULTS, FLIGHT_RECORDER_FILE
from osp_megatron.parallel.rendezvous import RENDEZVOUS_PORT_BASE, RENDEZVOUS_PORT_SPAN

from .cluster import ClusterConfig, sbatch_option, time_limit_minutes
from .task import JobTask


@dataclass
class Submission:
    job: str
    module: str
    arguments: list[str]
    cluster: ClusterConfig

    @property
    def folder(self) -> Path:
        """submitit's job folder; %j becomes the job id."""
        return Path(self.cluster.log_dir).absolute() / "%j"

    @property
    def python(self) -> str:
        if self.cluster.python:
            return self.cluster.python
        return "python" if self.cluster.container_image else shlex.quote(sys.executable)

    def task(self) -> JobTask:
        return JobTask(
            job=self.job,
            module=self.module,
            arguments=list(self.arguments),
            requeue=self.cluster.requeue,
            max_requeues=self.cluster.max_requeues,
            folder=str(self.folder),
        )

    def setup_lines(self) -> list[str]:
        """Shell lines of the batch script before srun; tasks inherit the environment they export."""
        cluster = self.cluster
        lines = list(cluster.setup)
        lines += [f"export {name}={shlex.quote(str(value))}" for name, value in cluster.env.items()]
        # Defaults the job also applies itself; exported here so the script shows them and the setup can override.
        lines += [
            f"export {name}=${{{name}:-{value}}}"
            for name, value in COMMUNICATION_DEFAULTS.items()
            if name not in cluster.env
        ]
        # Flight-recorder dumps of a hung collective land next to the task logs, one file per rank and one folder
        # per run of the job (a requeued job runs again under the same id).
        recorder = (
            shlex.quote(str(self.folder.parent)) + "/${SLURM_JOB_ID}/flight_recorder/restart_${SLURM_RESTART_COUNT:-0}"
        )
        lines += [
            f"mkdir -p {recorder}",
            f"export {FLIGHT_RECORDER_FILE}={recorder}/rank_",
            "export PYTHONUNBUFFERED=1",
        ]
        return lines

    def srun_arguments(self) -> list[str]:
        cluster = self.cluster
        arguments = ["--kill-on-bad-exit=1"]  # one failed rank ends the step instead of leaving the rest hanging
        if cluster.container_image:
            arguments += [f"--container-image={cluster.container_image}", "--container-workdir=" + str(Path.cwd())]
            if cluster.container_mounts:
                arguments.append(f"--container-mounts={cluster.container_mounts}")
        return arguments + list(cluster.srun_args)

    def parameters(self) -> dict:
        """Keyword arguments of submitit's SlurmExecutor.update_parameters."""
        cluster = self.cluster
        extra = {}
        for line in cluster.sbatch_lines:
            name, value = sbatch_option(line)
            extra[name] = value
        # submitit asks for USR2 and requeues at once from its handler; the job instead finishes its step, saves
        # on every rank and exits 0, and rank 0's task requeues afterwards (osp_launch.task).
        extra["signal"] = f"{cluster.stop_signal}@{cluster.stop_warning_seconds}"
        extra["requeue" if cluster.requeue else "no-requeue"] = True
        parameters = dict(
            job_name=cluster.job_name or self.job,
            nodes=cluster.nodes,
            ntasks_per_node=cluster.tasks,
            time=time_limit_minutes(cluster.time),
            setup=self.setup_lines(),
            srun_args=self.srun_arguments(),
            wckey=None,
            additional_parameters=extra,
        )
        optional = dict(
            gpus_per_node=cluster.gpus_per_node or None,
            cpus_per_task=cluster.cpus_per_task,
            mem=cluster.mem,
            partition=cluster.partition,
            account=cluster.account,
            qos=cluster.qos,
            exclusive=cluster.exclusive or None,
        )
        parameters.update({name: value for name, value in optional.items() if value is not None})
        return parameters

    def command(self) -> str:
        """What srun starts in every task: submitit's runner, which loads the pickled JobTask."""
        return f"{self.python} -u -m submitit.core._submit {shlex.quote(str(self.folder))}"

    def script(self) -> str:
        """The sbatch script, exactly as submitit writes it for `submit()`."""
        from submitit.slurm.slurm import _make_sbatch_string

        return _make_sbatch_string(command=self.command(), folder=self.folder, **self.parameters())

    def describe(self) -> str:
        """--dry-run output: the layout, what every task runs, and the sbatch script."""
        cluster = self.cluster
        arguments = " ".join(shlex.quote(a) for a in self.arguments)
        lines = [
            f"# {self.job}: {cluster.nodes} node(s) x {cluster.tasks} task(s) = {cluster.world_size} ranks"
            + (f", {cluster.gpus_per_node} GPU(s) per node" if cluster.gpus_per_node else ", no GPUs"),
            f"# every task runs: python -m {self.module} {arguments}",
            "#   with RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID, MASTER_ADDR = the "
            f"first node, MASTER_PORT = {RENDEZVOUS_PORT_BASE} + job id % {RENDEZVOUS_PORT_SPAN}",
            f"# logs: {self.folder}/%j_<task>_log.out and .err",
            f"# Slurm sends SIG{cluster.stop_signal} {cluster.stop_warning_seconds} s before the time limit: "
            "the job saves and exits 0" + (", then rank 0 requeues it" if cluster.requeue else ""),
            "",
            self.script(),
        ]
        return "\n".join(lines)

    def submit(self):
        """Submit through submitit; returns its SlurmJob (job_id, paths)."""
        if shutil.which("sbatch") is None:
            raise ConfigError("sbatch is not on PATH: submit from a Slurm login node, or use --dry-run / --local")
        import submitit

        executor = submitit.SlurmExecutor(folder=self.folder, python=self.python)
        executor.update_parameters(**self.parameters())
        return executor.submit(self.task())
