"""Training across two Slurm nodes through osp-launch: tensor ranks inside a node and FSDP across nodes end with
the losses of the same job on one node, the logs name every host and its ranks and read as plain lines, and a
preempted run requeues itself, resumes on the nodes it gets and still ends with those losses."""

import re


def test_two_nodes_train_like_one(lane, two_nodes, one_node):
    """2 nodes x 2 tasks (tensor 2 inside each node, FSDP over the nodes) complete with the one-node losses; the
    rendezvous is the first node by name, ranks 2-3 run on the second node, the final checkpoint is published."""
    job, info = two_nodes
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, job.log(0, "err"))
    lane.assert_same_losses(job.run_dir, one_node)
    assert (job.run_dir / "checkpoints" / "latest").read_text() == f"step_{lane.STEPS:08d}"
    hosts = job.hosts(0)
    first, second = hosts[0], hosts[2]
    assert hosts == {0: first, 1: first, 2: second, 3: second} and first != second, hosts
    log = job.log(0)
    assert f"rendezvous {first}:" in log and f"hosts: {first}: ranks 0-1; {second}: ranks 2-3" in log, log
    for rank in range(4):
        assert f"rank {rank} (local rank {rank % 2}) on {hosts[rank]}, restart 0" in job.log(rank)
    assert (
        "world 4 (dp 2, tp 2, ssp 1, ulysses 1, fsdp on: weights, gradients, optimizer state and EMA sharded "
        "over 2 ranks)"
        in log
        and f"finished at step {lane.STEPS}" in log
    )


def test_logs_are_plain_lines_from_rank_0(lane, two_nodes):
    """No terminal under Slurm: progress is one line every train.log_interval steps, on rank 0 only, and no log
    of any task holds a carriage return or an escape code."""
    job, _ = two_nodes
    progress = [line for line in job.log(0).splitlines() if line.startswith("[train] step ")]
    assert [line.split()[2] for line in progress] == [
        f"{step}/{lane.STEPS}" for step in range(lane.LOG_INTERVAL, lane.STEPS + 1, lane.LOG_INTERVAL)
    ]
    loss = lane.read_metrics(job.run_dir)[lane.LOG_INTERVAL]["loss"]
    assert f" loss={loss:.4g} " in progress[0] and " lr=" in progress[0] and " eta " in progress[0], progress[0]
    for rank in range(4):
        text = job.log(rank) + job.log(rank, "err")
        assert "\r" not in text and "\x1b" not in text, (rank, text[-2000:])
        if rank:
            assert "[train] step" not in text


def test_preempted_job_resumes_on_the_nodes_it_gets(lane, two_nodes):
    """scancel --signal=USR1 (what Slurm sends before the time limit) mid-run: every rank finishes its step and
    saves, rank 0 requeues the job; with its first node drained meanwhile the restart lands on other nodes, meets
    at another rendezvous host, resumes from that checkpoint and ends with the uninterrupted run's losses."""
    job = lane.submit("preempted")
    job.wait_for_steps(3)
    first_hosts = job.hosts(0)
    lane.run(["scancel", "--signal=USR1", job.id])
    lane.wait_for(lambda: job.info()["Restarts"] == "1", 120, "the requeue", job.id)
    lane.run(["scontrol", "update", f"nodename={first_hosts[0]}", "state=drain", "reason=lane: restart elsewhere"])
    try:
        info = job.wait_for_end()
    finally:
        lane.run(["scontrol", "update", f"nodename={first_hosts[0]}", "state=resume"])
    log = job.log(0)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log, job.log(0, "err"))
    second_hosts = job.hosts(1)
    assert first_hosts[0] not in second_hosts.values() and f"rendezvous {second_hosts[0]}:" in log, second_hosts
    stopped = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 3 <= stopped < lane.STEPS and f"stopped by SIGUSR1 at step {stopped}" in log, log
    assert lane.saved_steps(log[: log.index("resumed from")], job.run_dir)[-1] == stopped, log
    assert f"requeued job {job.id} (restart 1)" in log and f"finished at step {lane.STEPS}" in log
    # Rank 0 requeued only after every rank's job had ended: the requeue cut no task short.
    assert all("triggered an exception" not in job.log(rank, "err") for rank in range(4))
    lane.assert_same_losses(job.run_dir, lane.read_metrics(two_nodes[0].run_dir))
