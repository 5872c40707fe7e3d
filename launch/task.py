"""What each Slurm task of an osp-launch job runs: torchrun-style rank variables from Slurm's, the job as a child
process, and, on rank 0 after a stop signal, `scontrol requeue` so the job comes back and resumes.

The requeue ends every task of the job step at once (Slurm cancels the step with SIGTERM). So every task notes in
the job folder that its job has ended, and rank 0 requeues only once all of them have: a rank still leaving
its process (closing the process group, writing its result) is never cut short, and the first run of the job
ends without a failed task.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.supervisor import run_supervised, stopped_by
from osp_megatron.parallel.rendezvous import expand_nodelist, rendezvous_port


def task_environment(environ: dict) -> dict:
    """`environ` plus RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT
    derived from this Slurm task's variables (the rendezvous is on the allocation's first node)."""
    env = dict(environ)
    world = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    env.update(
        RANK=env["SLURM_PROCID"], WORLD_SIZE=str(world), LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(world // nodes), GROUP_RANK=env.get("SLURM_NODEID", "0"),
    )
    env.setdefault("MASTER_ADDR", expand_nodelist(env["SLURM_JOB_NODELIST"])[0])
    env.setdefault("MASTER_PORT", str(rendezvous_port(env["SLURM_JOB_ID"])))
    # As torchrun does: a rank's math threads stay within its share of the node instead of every core.
    env.setdefault("OMP_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK", "1"))
    return env


def say(text: str) -> None:
    print(f"[osp-launch] {text}", flush=True)


def requeue_job(job_id: str, restarts: int, max_requeues: int) -> bool:
    """Put this job back in the queue (it keeps its id, logs append); False when it may not come back."""
    if restarts >= max_requeues:
        say(f"job {job_id} was stopped but not requeued: it already restarted {restarts} times "
            f"(cluster.max_requeues={max_requeues}); submit it again to continue")
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        # Slurm already requeues a job it preempts with PreemptMode=REQUEUE; refusing a second requeue is fine.
        say(f"scontrol requeue {job_id} failed: {result.stderr.strip() or result.stdout.strip()}")
        return False
    say(f"requeued job {job_id} (restart {restarts + 1}); it resumes from its newest checkpoint")
    return True


def ended_marker(folder: Path, restart: int, rank: int) -> Path:
    """The file task `rank` writes once its job has ended in this run (restart) of the Slurm job."""
    return folder / "ended" / f"restart_{restart}" / f"rank_{rank}"


def note_ended(folder: Path, restart: int, rank: int, returncode: int) -> None:
    marker = ended_marker(folder, restart, rank)
    marker.parent.mkdir(parents=True, exist_ok=True)
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(f"{returncode}\n")
    partial.replace(marker)


def wait_for_ranks(folder: Path, restart: int, world: int, timeout: float) -> list[int]:
    """Wait until every rank has noted its end; returns the ranks still missing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [rank for rank in range(world) if not ended_marker(folder, restart, rank).exists()]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


@dataclass
class JobTask:
    """One task of a submitted job (pickled by submitit, loaded again after every requeue)."""

    job: str
    module: str
    # submitit's job folder (%j = job id): where the tasks note that their job has ended before rank 0 requeues.
    folder: str
    arguments: list[str] = field(default_factory=list)
    stop_signal: int = int(signal.SIGUSR1)
    requeue: bool = True
    max_requeues: int = 50
    # How long rank 0 waits for the other tasks' jobs to end before it requeues all the same.
    end_wait_seconds: float = 120.0

    def __call__(self) -> int:
        env = task_environment(os.environ)
        rank, world, restart = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("SLURM_RESTART_COUNT", 0))
        if rank == 0:
            say(f"{self.job} on {world} tasks, rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}, "
                f"restart {restart}")
        returncode, received = run_supervised([sys.executable, "-u", "-m", self.module, *self.arguments], env=env)
        folder = Path(self.folder.replace("%j", env["SLURM_JOB_ID"]))
        if self.requeue:
            note_ended(folder, restart, rank, returncode)
        if stopped_by(received, returncode, self.stop_signal):
            if rank == 0 and self.requeue:
                missing = wait_for_ranks(folder, restart, world, self.end_wait_seconds)
                if missing:
                    say(f"rank(s) {', '.join(map(str, missing))} had not ended {self.end_wait_seconds:g} s after "
                        "rank 0; requeueing all the same")
                requeue_job(env["SLURM_JOB_ID"], restart, self.max_requeues)
            return 0
        if returncode != 0:
            raise RuntimeError(f"{self.job} (python -m {self.module}) on rank {rank} exited with status "
                               f"{returncode}" + (f" after {', '.join(received)}" if received else ""))
        return 0
