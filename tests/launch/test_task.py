"""Inside a Slurm task: rank variables from Slurm's, and the requeue decision after the job ends (requeue only
after the stop signal, only from rank 0 once every task's job has ended, never past cluster.max_requeues; a
failed job is an error)."""

import os
import signal
import stat
import threading
import time

import pytest

from launch.supervisor import stopped_by
from launch.task import JobTask, ended_marker, note_ended, task_environment
from osp_megatron.parallel.rendezvous import rendezvous_port

SLURM_TASK = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[041-042]", "SLURM_JOB_ID": "5150"}


def test_task_environment_is_torchrun_style():
    """Task 9 of 2 x 8: RANK 9, LOCAL_RANK 1, 8 per node, node 1; the rendezvous is gpu041 at the job's port."""
    env = task_environment(SLURM_TASK)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["GROUP_RANK"]) == \
        ("9", "16", "1", "8", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu041", str(rendezvous_port(5150)))


def test_stopped_by_the_stop_signal_only():
    usr1 = signal.SIGUSR1
    assert stopped_by(["SIGUSR1"], 0, usr1)  # saved and exited 0
    assert stopped_by(["SIGUSR1"], -usr1, usr1)  # the signal came before the job could handle it
    assert not stopped_by(["SIGTERM"], 0, usr1)  # scancel: save and end, no requeue
    assert not stopped_by(["SIGUSR1"], 1, usr1)  # the job failed while stopping: an error, not a requeue
    assert not stopped_by([], 0, usr1)


@pytest.fixture
def slurm_task(tmp_path, monkeypatch):
    """A fake Slurm task: SLURM_* variables, an `scontrol` that records its arguments, and a job module that
    signals its parent (as Slurm signals every process of the step) and exits with a chosen status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "fake_job.py").write_text(
        "import os, signal, sys\n"
        "if sys.argv[1] != 'none':\n"
        "    os.kill(os.getppid(), getattr(signal, sys.argv[1]))\n"
        "sys.exit(int(sys.argv[2]))\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    one_node = {"SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "gpu041"}
    for name, value in {**SLURM_TASK, **one_node, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                        "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)

    def run(sent, status, other_rank_ended=True, **settings):
        if other_rank_ended:
            note_ended(tmp_path / "logs" / "5150", int(os.environ.get("SLURM_RESTART_COUNT", 0)), 1, 0)
        task = JobTask(job="osp-train", module="fake_job", arguments=[sent, str(status)],
                       folder=str(tmp_path / "logs" / "%j"), **settings)
        result = task()
        log = tmp_path / "scontrol.log"
        return result, log.read_text().split("\n")[:-1] if log.exists() else []
    run.folder = tmp_path / "logs" / "5150"
    return run


def test_rank0_requeues_after_the_stop_signal(slurm_task, capsys):
    assert slurm_task("SIGUSR1", 0) == (0, ["requeue 5150"])
    assert "requeued job 5150 (restart 1)" in capsys.readouterr().out
    assert ended_marker(slurm_task.folder, 0, 0).read_text() == "0\n"


def test_rank0_requeues_only_once_every_task_has_ended(slurm_task):
    """The requeue cancels the whole step: rank 0 waits until rank 1 has noted the end of its job."""
    def rank1_ends_later():
        time.sleep(1.0)
        note_ended(slurm_task.folder, 0, 1, 0)

    other = threading.Thread(target=rank1_ends_later)
    start = time.monotonic()
    other.start()
    assert slurm_task("SIGUSR1", 0, other_rank_ended=False) == (0, ["requeue 5150"])
    assert time.monotonic() - start >= 1.0
    other.join()


def test_rank0_requeues_all_the_same_when_a_task_never_ends(slurm_task, capsys):
    assert slurm_task("SIGUSR1", 0, other_rank_ended=False, end_wait_seconds=0.5) == (0, ["requeue 5150"])
    assert "rank(s) 1 had not ended 0.5 s after rank 0; requeueing all the same" in capsys.readouterr().out


def test_no_requeue_after_cancel_or_completion_or_when_disabled(slurm_task):
    assert slurm_task("SIGTERM", 0) == (0, [])
    assert slurm_task("none", 0) == (0, [])
    assert slurm_task("SIGUSR1", 0, requeue=False) == (0, [])


def test_requeues_stop_at_the_limit(slurm_task, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert slurm_task("SIGUSR1", 0, max_requeues=3) == (0, [])
    assert "not requeued: it already restarted 3 times (cluster.max_requeues=3)" in capsys.readouterr().out


def test_other_ranks_never_requeue_and_note_their_end(slurm_task, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert slurm_task("SIGUSR1", 0, other_rank_ended=False) == (0, [])
    assert ended_marker(slurm_task.folder, 0, 1).read_text() == "0\n"


def test_a_failed_job_fails_the_task(slurm_task):
    with pytest.raises(RuntimeError, match="osp-train .* on rank 0 exited with status 3"):
        slurm_task("none", 3)
