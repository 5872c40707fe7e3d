"""The Slurm lane: osp-launch against a real (one-node) Slurm. A two-task tiny training runs to its end; a second
one is sent the stop signal mid-run, saves, requeues itself, resumes and ends with the uninterrupted run's losses.

Runs only with OSP_SLURM_LANE=1 (`bash .ci/slurm_lane.sh` starts Slurm and sets it); then Slurm must answer.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20

pytestmark = pytest.mark.skipif(os.environ.get("OSP_SLURM_LANE") != "1",
                                reason="the Slurm lane runs with OSP_SLURM_LANE=1 (bash .ci/slurm_lane.sh)")


def run(command, timeout=120) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def job_info(job_id: str) -> dict:
    text = run(["scontrol", "show", "job", "-o", job_id])
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for_end(job_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    requeued_at = None
    while time.time() < deadline:
        info = job_info(job_id)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if info["JobState"] == "PENDING" and info["Reason"] == "BeginTime" and info["Restarts"] != "0":
            # Slurm keeps a requeued job ineligible for two minutes, time for the node to let the first run go and
            # revoke its credential; started again too soon, the job is killed ("Job credential revoked") and
            # fails. The lane shortens the wait, but only once the node is idle again and a few seconds on.
            requeued_at = requeued_at or time.time()
            node_idle = run(["sinfo", "-h", "-N", "-o", "%T"]).split() == ["idle"]
            if node_idle and time.time() - requeued_at >= 5:
                run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s: {job_info(job_id)}")


def read_metrics(run_dir: Path) -> dict:
    """Step -> record; a step logged again after a resume keeps its newest record."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {row["step"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def lane(tmp_path_factory):
    assert subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0, \
        "OSP_SLURM_LANE=1 but Slurm does not answer; start it with bash .ci/start_slurm.sh"
    root = tmp_path_factory.mktemp("slurm_lane")

    def submit(name: str) -> tuple[str, Path, Path]:
        run_dir, log_dir = root / name, root / "logs"
        out = run([sys.executable, "-m", "launch.cli", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node",
                   "2", "--time", "15", "--stop-warning-seconds", "60", "--log-dir", str(log_dir), "--job-name",
                   f"lane-{name}", "osp-train", "--config", "examples/tiny_t2v.yaml", f"run.dir={run_dir}",
                   f"data.path={root / 'data'}", "train.eval_interval=0", f"train.steps={STEPS}", "checkpoint.interval=8",
                   "train.sample_at_end=false", "train.progress=false", "train.device=cpu",
                   "train.micro_batch_size=4", "data.synthetic_num_samples=64", "data.synthetic_samples_per_shard=32"])
        job_id = re.search(r"submitted osp-train as Slurm job (\d+)", out).group(1)
        return job_id, run_dir, log_dir / job_id

    return submit


@pytest.fixture(scope="module")
def uninterrupted(lane):
    job_id, run_dir, logs = lane("uninterrupted")
    return job_id, run_dir, logs, wait_for_end(job_id, timeout=600)


def test_two_task_training_completes(uninterrupted):
    """Two Slurm tasks train to the end: every step in metrics.jsonl, the final checkpoint published, one log
    per task, rank 0's log names the rendezvous and the finish."""
    job_id, run_dir, logs, info = uninterrupted
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    rows = read_metrics(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(rows[s]["loss"] > 0 and "samples_per_s" in rows[s] for s in rows)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "metadata.json").exists()
    log = (logs / f"{job_id}_0_log.out").read_text()
    assert "osp-train on 2 tasks, rendezvous" in log and f"finished at step {STEPS}" in log
    assert (logs / f"{job_id}_1_log.out").exists()


def test_preempted_job_saves_requeues_resumes_and_matches(lane, uninterrupted):
    """scancel --signal=USR1 (what Slurm sends before the time limit, or at preemption with send_user_signal)
    mid-run: the job finishes its step, saves, rank 0 requeues it, it resumes from that checkpoint and ends
    with the same loss at every step as the uninterrupted run (to 1e-5)."""
    job_id, run_dir, logs = lane("preempted")
    deadline = time.time() + 300
    while len(read_metrics(run_dir)) < 3:
        assert time.time() < deadline, f"job {job_id} logged no steps: {job_info(job_id)}"
        assert job_info(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), job_info(job_id)
        time.sleep(0.2)
    run(["scancel", "--signal=USR1", job_id])
    info = wait_for_end(job_id, timeout=600)
    log = (logs / f"{job_id}_0_log.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)

    stopped = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 3 <= stopped < STEPS, log
    assert f"saved checkpoint {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in log
    assert f"requeued job {job_id} (restart 1)" in log and f"finished at step {STEPS}" in log
    # Rank 0 requeued only after rank 1's job had ended: the requeue cut no task short.
    assert "triggered an exception" not in (logs / f"{job_id}_1_log.err").read_text()
    reference, resumed = read_metrics(uninterrupted[1]), read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) <= 1e-5, (step, resumed[step], reference[step])
