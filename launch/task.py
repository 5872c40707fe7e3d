"""What each Slurm task of an osp-launch job runs: torchrun-style rank variables from Slurm's, the job as a child
process, and afterwards the verdict Slurm records: finished, requeued after a stop, or failed (docs/cluster.md).

Every task notes in the job folder where it runs and how its job ended (status, stop signals received). Rank 0
decides from all the notes, once every task has written its own: the requeue cancels the whole job step, so a
rank still leaving its process is never cut short. A job that was stopped before its end never exits 0 unless it
was requeued, whichever task the signal reached and whoever sent it. A failed task waits a little for the others
to note their end too, so the ranks still waiting in a collective time out and leave their hang dumps before
srun's --kill-on-bad-exit ends the step.
"""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from osp_megatron.parallel.rendezvous import expand_nodelist, rendezvous_port

from .supervisor import run_supervised, stopped_by

# Slurm job states in which Slurm itself has already decided the job's fate (cancelled, timed out, preempted,
# requeued): a requeue from rank 0 then would undo a user's scancel or requeue a job twice.
RUNNING_STATES = ("RUNNING", "CONFIGURING", "COMPLETING")


def task_environment(environ: dict) -> dict:
    """`environ` plus RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT
    derived from this Slurm task's variables (the rendezvous is on the allocation's first node)."""
    env = dict(environ)
    world = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    env.update(
        RANK=env["SLURM_PROCID"],
        WORLD_SIZE=str(world),
        LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(world // nodes),
        GROUP_RANK=env.get("SLURM_NODEID", "0"),
    )
    env.setdefault("MASTER_ADDR", expand_nodelist(env["SLURM_JOB_NODELIST"])[0])
    env.setdefault("MASTER_PORT", str(rendezvous_port(env["SLURM_JOB_ID"])))
    # As torchrun does: a rank's math threads stay within its share of the node instead of every core.
    env.setdefault("OMP_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK", "1"))
    return env


def tasks_per_node(text: str) -> list[int]:
    """Slurm's SLURM_STEP_TASKS_PER_NODE ('2(x3),1') as one count per node ([2, 2, 2, 1])."""
    counts = []
    for part in text.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for index, rank in enumerate(ranks):
        if start is None:
            start = rank
        if index + 1 == len(ranks) or ranks[index + 1] != rank + 1:
            parts.append(str(start) if start == rank else f"{start}-{rank}")
            start = None
    return ", ".join(parts)


def host_layout(nodelist: str, counts: str) -> str:
    """Which ranks run on which host under srun's default block distribution, e.g. 'node1: ranks 0-1; node2:
    ranks 2-3' for nodelist 'node[1-2]' and counts '2(x2)'."""
    lines, first = [], 0
    for host, count in zip(expand_nodelist(nodelist), tasks_per_node(counts)):
        lines.append(f"{host}: rank{'s' if count > 1 else ''} {rank_ranges(list(range(first, first + count)))}")
        first += count
    return "; ".join(lines)


def say(text: str) -> None:
    print(f"[osp-launch] {text}", flush=True)


def note_path(folder: Path, kind: str, restart: int, rank: int) -> Path:
    """The note task `rank` writes in this run (restart) of the Slurm job: kind 'started' or 'ended'."""
    return folder / kind / f"restart_{restart}" / f"rank_{rank}"


def write_note(folder: Path, kind: str, restart: int, rank: int, **content) -> None:
    note = note_path(folder, kind, restart, rank)
    note.parent.mkdir(parents=True, exist_ok=True)
    partial = note.with_name(note.name + ".partial")
    partial.write_text(json.dumps(content) + "\n")
    partial.replace(note)  # a reader sees the whole note or none


def read_notes(folder: Path, kind: str, restart: int) -> dict[int, dict]:
    """Rank -> the note it wrote, for every rank that wrote one."""
    notes = {}
    for path in (folder / kind / f"restart_{restart}").glob("rank_*"):
        if path.name[len("rank_") :].isdigit():
            notes[int(path.name[len("rank_") :])] = json.loads(path.read_text())
    return notes


def wait_for_ranks(folder: Path, restart: int, world: int, timeout: float) -> list[int]:
    """Wait until every rank has noted its end; returns the ranks still missing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [rank for rank in range(world) if not note_path(folder, "ended", restart, rank).exists()]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as Slurm sees it now (RUNNING, CANCELLED, ...), or None when Slurm does not answer."""
    try:
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for item in result.stdout.split():
        if item.startswith("JobState="):
            return item[len("JobState=") :]
    return None


def requeue_job(job_id: str, restarts: int, max_requeues: int) -> str | None:
    """Put this job back in the queue (it keeps its id, logs append); None when done, else why it was not."""
    if restarts >= max_requeues:
        return f"it already restarted {restarts} times (cluster.max_requeues={max_requeues})"
    state = slurm_job_state(job_id)
    if state is not None and state not in RUNNING_STATES:
        return f"Slurm has already ended it ({state})"
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return f"scontrol requeue {job_id} failed: {result.stderr.strip() or result.stdout.strip()}"
    say(f"requeued job {job_id} (restart {restarts + 1}); it resumes from its newest checkpoint")
    return None


class StoppedBeforeItsEnd(RuntimeError):
    """The job saved and exited after a stop signal but was not requeued: Slurm must not record a success."""


@dataclass
class JobTask:
    """One task of a submitted job (pickled by submitit, loaded again after every requeue)."""

    job: str
    module: str
    # submitit's job folder (%j = job id): the tasks' notes (started/, ended/) live here.
    folder: str
    arguments: list[str] = field(default_factory=list)
    requeue: bool = True
    max_requeues: int = 50
    # How long rank 0 waits for the other tasks' jobs to end before it decides all the same.
    end_wait_seconds: float = 120.0
    # How long a failed task waits for the others before srun's --kill-on-bad-exit ends them: time for ranks
    # waiting in a collective with the failed one to time out or see it gone, and to write their hang dumps.
    failure_wait_seconds: float = 20.0

    def __call__(self) -> int:
        env = task_environment(os.environ)
        rank, world, restart = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("SLURM_RESTART_COUNT", 0))
        folder = Path(self.folder.replace("%j", env["SLURM_JOB_ID"]))
        host = socket.gethostname()
        write_note(folder, "started", restart, rank, host=host, local_rank=int(env["LOCAL_RANK"]), pid=os.getpid())
        say(f"rank {rank} (local rank {env['LOCAL_RANK']}) on {host}, restart {restart}")
        if rank == 0:
            say(f"{self.job} on {world} tasks, rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}, restart {restart}")
            nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
            counts = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
            if counts:
                say(f"hosts: {host_layout(nodelist, counts)}")
        returncode, received = run_supervised([sys.executable, "-u", "-m", self.module, *self.arguments], env=env)
        write_note(folder, "ended", restart, rank, returncode=returncode, signals=received, host=host)
        ended_well = stopped_by(received, returncode) if received else returncode == 0
        if not ended_well:
            missing = wait_for_ranks(folder, restart, world, self.failure_wait_seconds)
            raise RuntimeError(
                f"{self.job} (python -m {self.module}) on rank {rank} exited with status {returncode}"
                f" on {host}"
                + (f" after {', '.join(received)}" if received else "")
                + (
                    f"; rank(s) {rank_ranges(missing)} had not ended {self.failure_wait_seconds:g} s later"
                    if missing
                    else ""
                )
            )
        if rank != 0:
            return 0
        return self._decide(folder, env["SLURM_JOB_ID"], restart, world)

    def _decide(self, folder: Path, job_id: str, restart: int, world: int) -> int:
        """Rank 0, its own job ended well: finished (0), or stopped early on some rank, then requeued or raised."""
        missing = wait_for_ranks(folder, restart, world, self.end_wait_seconds)
        if missing:
            say(
                f"rank(s) {rank_ranges(missing)} had not ended {self.end_wait_seconds:g} s after rank 0; deciding "
                "all the same"
            )
        signals = sorted({name for note in read_notes(folder, "ended", restart).values() for name in note["signals"]})
        if not signals:
            return 0
        # A job that finished as the signal came is requeued too: the new run finds train.steps reached and ends.
        reason = "cluster.requeue is off" if not self.requeue else requeue_job(job_id, restart, self.max_requeues)
        if reason is None:
            return 0
        raise StoppedBeforeItsEnd(
            f"{self.job} stopped after {', '.join(signals)} and saved, but was not requeued: "
            f"{reason}; submit the same command again to continue from its checkpoint"
        )
