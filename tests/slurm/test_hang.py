"""A hang across nodes: one rank of a two-node training is stopped (SIGSTOP) mid-run. The others fail after the
collective timeout (parallel.timeout_minutes), every one of them leaves its dump (flight recorder and stacks) in
the job's log folder, the job ends, and the hang report made from those dumps names the stopped rank and its host."""

import signal
import sys
import time

import psutil

TIMEOUT_SECONDS = 30


def test_a_stopped_rank_is_found_from_the_others_dumps(lane):
    job = lane.submit(
        "hang",
        [
            *lane.TRAINING,
            f"parallel.timeout_minutes={TIMEOUT_SECONDS / 60}",
            "checkpoint.interval=0",
            "checkpoint.save_at_end=false",
        ],
    )
    job.wait_for_steps(3)
    task = psutil.Process(job.started(0)[3]["pid"])  # osp-launch's task of rank 3, on the second node
    (training,) = [child for child in task.children() if "osp_megatron.training.cli" in child.cmdline()]
    training.send_signal(signal.SIGSTOP)
    lane.wait_for(lambda: training.status() == psutil.STATUS_STOPPED, 10, "rank 3 stopped")
    stopped_at = time.time()
    info = job.wait_for_end(timeout=TIMEOUT_SECONDS + 120)
    ended_after = time.time() - stopped_at
    assert info["JobState"] == "FAILED", info
    assert ended_after < TIMEOUT_SECONDS + 60, ended_after  # the timeout, the dumps, srun ending the step
    assert not psutil.pid_exists(training.pid) or training.status() == psutil.STATUS_ZOMBIE

    # Every rank that survived dumped; the stopped one may have too, if Slurm's SIGCONT (sent before it ends a
    # step) let it run into its own timeout before the SIGKILL.
    dumps = job.logs / "flight_recorder" / "restart_0"
    for rank in range(3):
        assert (dumps / f"rank_{rank}").stat().st_size > 0 and (dumps / f"stack_rank_{rank}.json").is_file()
        assert "collective failed" in job.log(rank, "err") and f"flight recorder dump: {dumps}/rank_{rank}" in job.log(
            rank, "err"
        ), job.log(rank, "err")[-3000:]
    host = job.hosts(0)[3]
    report = lane.run([sys.executable, "-m", "osp_launch.hang", str(job.logs)])
    assert f"=> the others waited for rank(s) 3 on {host}: " in report, report
