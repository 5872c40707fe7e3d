"""Inside a Slurm task: rank variables from Slurm's, where each rank runs, and the verdict after the job ends
(rank 0 requeues after a stop signal on any rank once every task's job has ended, never past cluster.max_requeues
nor after Slurm ended the job; a stopped job that is not requeued never exits 0; a failed job is an error that
waits for the other ranks first)."""

import os
import signal
import stat
import threading
import time

import pytest

from osp_launch.supervisor import stopped_by
from osp_launch.task import JobTask, StoppedBeforeItsEnd, host_layout, read_notes, task_environment, write_note
from osp_megatron.parallel.rendezvous import rendezvous_port

SLURM_TASK = {
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[041-042]",
    "SLURM_JOB_ID": "5150",
}


def test_task_environment_is_torchrun_style():
    """Task 9 of 2 x 8: RANK 9, LOCAL_RANK 1, 8 per node, node 1; the rendezvous is gpu041 at the job's port."""
    env = task_environment(SLURM_TASK)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["GROUP_RANK"]) == (
        "9",
        "16",
        "1",
        "8",
        "1",
    )
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu041", str(rendezvous_port(5150)))


def test_host_layout_names_each_host_and_its_ranks():
    """srun's block distribution: tasks fill the first node, then the next."""
    assert host_layout("osp-node[1-2]", "2(x2)") == "osp-node1: ranks 0-1; osp-node2: ranks 2-3"
    assert host_layout("gpu[7,9],cpu1", "3,2,1") == "gpu7: ranks 0-2; gpu9: ranks 3-4; cpu1: rank 5"


def test_stopped_by_any_stop_signal():
    usr1, term = signal.SIGUSR1, signal.SIGTERM
    assert stopped_by(["SIGUSR1"], 0)  # saved and exited 0
    assert stopped_by(["SIGUSR1"], -usr1)  # the signal came before the job could handle it
    assert stopped_by(["SIGTERM"], 128 + term)
    assert stopped_by(["SIGTERM", "SIGUSR1"], -usr1)
    assert not stopped_by(["SIGUSR1"], 1)  # the job failed while stopping: an error, not a stop
    assert not stopped_by(["SIGTERM"], -usr1)
    assert not stopped_by([], 0)


@pytest.fixture
def slurm_task(tmp_path, monkeypatch):
    """A fake Slurm task: SLURM_* variables, an `scontrol` that reports the job in state $FAKE_JOB_STATE and
    records its other arguments, and a job module that signals its parent (as Slurm signals every process of the
    step) and exits with a chosen status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = show ]; then\n'
        '    echo "JobId=5150 JobState=${FAKE_JOB_STATE:-RUNNING}"; exit 0\n'
        "fi\n"
        f'echo "$@" >> {tmp_path / "scontrol.log"}\n'
    )
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "fake_job.py").write_text(
        "import os, signal, sys\n"
        "if sys.argv[1] != 'none':\n"
        "    os.kill(os.getppid(), getattr(signal, sys.argv[1]))\n"
        "sys.exit(int(sys.argv[2]))\n"
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    one_node = {"SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "gpu041"}
    for name, value in {
        **SLURM_TASK,
        **one_node,
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    folder = tmp_path / "logs" / "5150"

    def run(sent, status, other_rank_ended=True, other_rank_signals=(), **settings):
        if other_rank_ended:
            note_end(1, signals=list(other_rank_signals))
        task = JobTask(
            job="osp-train",
            module="fake_job",
            arguments=[sent, str(status)],
            folder=str(tmp_path / "logs" / "%j"),
            **settings,
        )
        result = task()
        return result, requeues()

    def note_end(rank, signals=()):
        write_note(
            folder,
            "ended",
            int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            rank,
            returncode=0,
            signals=list(signals),
            host="gpu041",
        )

    def requeues():
        log = tmp_path / "scontrol.log"
        return log.read_text().split("\n")[:-1] if log.exists() else []

    run.folder, run.note_end, run.requeues = folder, note_end, requeues
    return run


def test_rank0_requeues_after_the_stop_signal(slurm_task, capsys):
    assert slurm_task("SIGUSR1", 0) == (0, ["requeue 5150"])
    out = capsys.readouterr().out
    assert "requeued job 5150 (restart 1)" in out and "rank 0 (local rank 0) on " in out
    assert read_notes(slurm_task.folder, "ended", 0)[0]["signals"] == ["SIGUSR1"]
    assert read_notes(slurm_task.folder, "started", 0)[0]["local_rank"] == 0


def test_rank0_requeues_only_once_every_task_has_ended(slurm_task):
    """The requeue cancels the whole step: rank 0 waits until rank 1 has noted the end of its job."""

    def rank1_ends_later():
        time.sleep(1.0)
        slurm_task.note_end(1)

    other = threading.Thread(target=rank1_ends_later)
    start = time.monotonic()
    other.start()
    assert slurm_task("SIGUSR1", 0, other_rank_ended=False) == (0, ["requeue 5150"])
    assert time.monotonic() - start >= 1.0
    other.join()


def test_rank0_requeues_all_the_same_when_a_task_never_ends(slurm_task, capsys):
    assert slurm_task("SIGUSR1", 0, other_rank_ended=False, end_wait_seconds=0.5) == (0, ["requeue 5150"])
    assert "rank(s) 1 had not ended 0.5 s after rank 0; deciding all the same" in capsys.readouterr().out


def test_a_signal_that_reached_another_task_requeues_too(slurm_task):
    """Rank 1 alone got SIGTERM (its job stopped, and with it every rank at the same step): rank 0 requeues."""
    assert slurm_task("none", 0, other_rank_signals=["SIGTERM"]) == (0, ["requeue 5150"])


def test_a_finished_job_is_a_success(slurm_task):
    assert slurm_task("none", 0) == (0, [])


def test_a_stopped_job_that_is_not_requeued_never_succeeds(slurm_task, monkeypatch):
    """SIGTERM of a running job (sent by hand, or by Slurm while the job stays RUNNING) requeues it; after scancel
    (CANCELLED) or with requeue off it is not requeued, and the task fails instead of reporting a completion."""
    assert slurm_task("SIGTERM", 0) == (0, ["requeue 5150"])
    monkeypatch.setenv("FAKE_JOB_STATE", "CANCELLED")
    with pytest.raises(
        StoppedBeforeItsEnd,
        match=r"after SIGTERM and saved, but was not requeued: Slurm has "
        r"already ended it \(CANCELLED\)",
    ):
        slurm_task("SIGTERM", 0)
    monkeypatch.setenv("FAKE_JOB_STATE", "RUNNING")
    with pytest.raises(StoppedBeforeItsEnd, match="cluster.requeue is off"):
        slurm_task("SIGUSR1", 0, requeue=False)
    assert slurm_task.requeues() == ["requeue 5150"]


def test_requeues_stop_at_the_limit(slurm_task, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(StoppedBeforeItsEnd, match=r"already restarted 3 times \(cluster.max_requeues=3\)"):
        slurm_task("SIGUSR1", 0, max_requeues=3)
    assert slurm_task.requeues() == []


def test_other_ranks_never_requeue_and_note_their_end(slurm_task, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert slurm_task("SIGUSR1", 0, other_rank_ended=False) == (0, [])
    host = read_notes(slurm_task.folder, "started", 0)[1]["host"]
    assert read_notes(slurm_task.folder, "ended", 0)[1] == {"returncode": 0, "signals": ["SIGUSR1"], "host": host}


def test_a_failed_job_fails_the_task_after_waiting_for_the_others(slurm_task, monkeypatch):
    """The task fails, but only once the other rank noted its end or failure_wait_seconds passed, so that ranks
    waiting in a collective with it reach their own timeout and write their hang dumps first."""
    with pytest.raises(RuntimeError, match="osp-train .* on rank 0 exited with status 3 on "):
        slurm_task("none", 3)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a new run: rank 1 has not noted its end in this one
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"status 3 on .*; rank\(s\) 1 had not ended 0.5 s later"):
        slurm_task("none", 3, other_rank_ended=False, failure_wait_seconds=0.5)
    assert time.monotonic() - start >= 0.5
    assert slurm_task.requeues() == []
