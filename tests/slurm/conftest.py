"""The Slurm lane's helpers: submit a tiny job through osp-launch to the multi-node Slurm of .ci/slurm_cluster.sh,
follow it through Slurm, read its metrics and the notes its tasks wrote (hosts, pids, how each run ended).

Runs only with OSP_SLURM_LANE=1 (`bash .ci/slurm_lane.sh` starts the cluster and sets it); then Slurm must answer.
"""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from osp_launch.task import read_notes

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16
CHECKPOINT_INTERVAL = 4
LOG_INTERVAL = 4
ENDED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)
# The tiny DiT with tensor ranks inside a node (parallel.tensor=2) and FSDP over the data ranks across nodes.
TRAINING = [
    "--config",
    "examples/tiny_t2v.yaml",
    "train.eval_interval=0",
    f"train.steps={STEPS}",
    f"checkpoint.interval={CHECKPOINT_INTERVAL}",
    "checkpoint.keep_last=0",
    "train.sample_at_end=false",
    "train.device=cpu",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    f"train.log_interval={LOG_INTERVAL}",
    "data.synthetic_num_samples=64",
    "data.synthetic_samples_per_shard=32",
    "parallel.tensor=2",
    "parallel.fsdp=true",
]


def pytest_collection_modifyitems(config, items):
    """Outside the lane every test of this folder is skipped: they need the cluster of .ci/slurm_cluster.sh."""
    if os.environ.get("OSP_SLURM_LANE") == "1":
        return
    skip = pytest.mark.skip(reason="the Slurm lane runs with OSP_SLURM_LANE=1 (bash .ci/slurm_lane.sh)")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


def run(command, timeout=120) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def job_info(job_id: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S*)", run(["scontrol", "show", "job", "-o", job_id])))


def node_states() -> dict:
    return dict(line.split() for line in run(["sinfo", "-h", "-N", "-o", "%N %T"]).splitlines())


def wait_for(condition, timeout: float, what: str, job_id: str | None = None, interval: float = 0.2):
    """Poll `condition()` until it returns something true; fail naming `what` (and the job's state) at timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s" + (f"; job {job_info(job_id)}" if job_id else ""))


def read_metrics(run_dir: Path) -> dict:
    """Step -> record; a step logged again after a resume keeps its newest record."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {row["step"]: row for row in map(json.loads, path.read_text().splitlines())}


@dataclass
class Job:
    """A submitted job: its id, run folder and log folder (slurm_logs/<id>)."""

    id: str
    run_dir: Path
    logs: Path

    def info(self) -> dict:
        return job_info(self.id)

    def wait_for_end(self, timeout: float = 600) -> dict:
        try:
            return wait_for(
                lambda: (info := self.info())["JobState"] in ENDED and info,
                timeout,
                f"job {self.id} to end",
                self.id,
                interval=1,
            )
        except AssertionError:
            subprocess.run(["scancel", self.id])
            raise

    def wait_for_steps(self, steps: int, timeout: float = 300) -> None:
        def logged():
            assert self.info()["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), self.info()
            return len(read_metrics(self.run_dir)) >= steps

        wait_for(logged, timeout, f"job {self.id} to log {steps} steps", self.id)

    def log(self, rank: int, kind: str = "out") -> str:
        path = self.logs / f"{self.id}_{rank}_log.{kind}"
        return path.read_text(errors="replace") if path.exists() else ""

    def hosts(self, restart: int) -> dict:
        """Rank -> the host its task ran on in run `restart` of the job (from the task's own note)."""
        return {rank: note["host"] for rank, note in read_notes(self.logs, "started", restart).items()}

    def started(self, restart: int) -> dict:
        return read_notes(self.logs, "started", restart)


class Lane:
    """What the lane's tests share: submit(...) into the lane's Slurm, and the checks of a run's losses and logs."""

    STEPS, CHECKPOINT_INTERVAL, LOG_INTERVAL, TRAINING = STEPS, CHECKPOINT_INTERVAL, LOG_INTERVAL, TRAINING
    run, wait_for, node_states, read_metrics = (
        staticmethod(run),
        staticmethod(wait_for),
        staticmethod(node_states),
        staticmethod(read_metrics),
    )

    def __init__(self, root: Path):
        self.root = root

    def submit(
        self,
        name: str,
        arguments: list[str] = TRAINING,
        job: str = "osp-train",
        nodes: int = 2,
        tasks_per_node: int = 2,
    ) -> Job:
        """osp-launch `job` with `arguments` on nodes x tasks_per_node CPU ranks; every job shares one data set."""
        run_dir, log_dir = self.root / name, self.root / "logs"
        out = run(
            [
                sys.executable,
                "-m",
                "osp_launch.cli",
                "--nodes",
                str(nodes),
                "--gpus-per-node",
                "0",
                "--tasks-per-node",
                str(tasks_per_node),
                "--time",
                "15",
                "--stop-warning-seconds",
                "60",
                "--log-dir",
                str(log_dir),
                "--job-name",
                f"lane-{name}",
                job,
                *arguments,
                f"run.dir={run_dir}",
                # osp-train's jobs share one data set; osp-grpo reads no data set (it refuses data.path).
                *([f"data.path={self.root / 'data'}"] if job == "osp-train" else []),
            ]
        )
        job_id = re.search(rf"submitted {job} as Slurm job (\d+)", out).group(1)
        return Job(job_id, run_dir, log_dir / job_id)

    @staticmethod
    def assert_same_losses(run_dir: Path, reference: dict) -> None:
        """Every step of the run logged once, each loss within 1e-5 of the reference's."""
        rows = read_metrics(run_dir)
        assert sorted(rows) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert abs(rows[step]["loss"] - reference[step]["loss"]) <= 1e-5, (step, rows[step], reference[step])

    @staticmethod
    def saved_steps(log: str, run_dir: Path) -> list[int]:
        """The steps whose checkpoint rank 0's log says were saved, in order."""
        folder = re.escape(str(run_dir / "checkpoints"))
        return [int(step) for step in re.findall(rf"saved checkpoint {folder}/step_(\d+)", log)]


@pytest.fixture(scope="session")
def lane(tmp_path_factory) -> Lane:
    assert subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0, (
        "OSP_SLURM_LANE=1 but Slurm does not answer; start it with bash .ci/slurm_cluster.sh up"
    )
    return Lane(tmp_path_factory.mktemp("slurm_lane"))


@pytest.fixture(scope="session")
def one_node(lane):
    """The training on one node (4 ranks): the losses every multi-node run must end with."""
    job = lane.submit("one_node", nodes=1, tasks_per_node=4)
    info = job.wait_for_end()
    assert info["JobState"] == "COMPLETED", (info, job.log(0), job.log(0, "err"))
    return read_metrics(job.run_dir)


@pytest.fixture(scope="session")
def two_nodes(lane):
    """The same training on two nodes, run to its end: (job, Slurm's record of it)."""
    job = lane.submit("two_nodes")
    return job, job.wait_for_end()
