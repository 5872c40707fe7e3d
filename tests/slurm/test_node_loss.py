"""A node dies under a running two-node training: its cable is cut and its slurmd and tasks are killed. The job
ends, Slurm declares the node down and requeues the job, the restart runs on the nodes left and resumes from the
newest complete checkpoint (never one being written when the node died) with the uninterrupted run's losses; the
node returns to service once its slurmd is back."""

import re
import time

from osp_launch.task import read_notes


def test_a_lost_node_ends_the_job_which_resumes_on_the_nodes_left(lane, two_nodes):
    job = lane.submit("node_lost")
    job.wait_for_steps(lane.CHECKPOINT_INTERVAL + 1)
    lost = job.hosts(0)[2]  # the second node of the allocation, where ranks 2-3 run
    # The next checkpoint is a few steps away: the node dies while it is being written when the lane sees its
    # folder in time (a tiny save takes a fraction of a second), else just after.
    checkpoints = job.run_dir / "checkpoints"
    try:
        writing = lane.wait_for(
            lambda: list(checkpoints.glob("step_*.tmp")), 30, "a checkpoint being written", interval=0.005
        )
    except AssertionError:
        writing = []
    killed_at = time.time()
    lane.run(["bash", ".ci/slurm_cluster.sh", "node-stop", lost])
    try:
        # Slurm declares the node down after SlurmdTimeout, ends the job on the other node and requeues it, long
        # before the collective timeout: no rank is left waiting for the dead node.
        lane.wait_for(lambda: job.info()["Restarts"] == "1", 120, "the requeue after the node died", job.id)
        ended_after = time.time() - killed_at
        assert lane.node_states()[lost].startswith("down"), lane.node_states()
        info = job.wait_for_end()
    finally:
        lane.run(["bash", ".ci/slurm_cluster.sh", "node-start", lost])
    log = job.log(0)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log, job.log(0, "err"))
    assert ended_after < 90, ended_after  # SlurmdTimeout (20 s) and a ping, KillWait (10 s), on a busy machine
    assert lost not in job.hosts(1).values(), job.hosts(1)
    assert not {2, 3} & set(read_notes(job.logs, "ended", 0)), "the lost node's tasks noted an end"
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    first_run = log[: log.index("resumed from")]
    assert lane.saved_steps(first_run, job.run_dir)[-1] == resumed, first_run
    # A checkpoint being written when the node died was never published, so never resumed from.
    assert all(int(path.name[len("step_") : -len(".tmp")]) > resumed for path in writing), (writing, resumed)
    lane.assert_same_losses(job.run_dir, lane.read_metrics(two_nodes[0].run_dir))
    lane.wait_for(lambda: lane.node_states()[lost] == "idle", 60, f"{lost} back in service")
