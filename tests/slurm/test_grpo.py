"""osp-grpo across two Slurm nodes: three policy ranks and, with grpo.reward_ranks=1, the reward rank on the
second node score and train two iterations to their end."""


def test_grpo_with_its_reward_rank_on_the_second_node(lane):
    prompts = "[a red circle moving left, a blue square moving up, a green wide bar staying still]"
    job = lane.submit(
        "grpo",
        job="osp-grpo",
        arguments=[
            "--config",
            "examples/grpo_tiny.yaml",
            "train.steps=2",
            "train.device=cpu",
            "train.lr=1e-3",
            "train.min_lr=1e-3",
            "train.micro_batch_size=2",
            "train.log_interval=1",
            "model.num_layers=2",
            "model.vae=tiny-random",
            "checkpoint.load=null",
            "checkpoint.interval=0",
            "grpo.num_steps=4",
            "grpo.window_size=2",
            "grpo.window_mode=sliding",
            "grpo.group_size=2",
            "grpo.prompts_per_iteration=3",
            "grpo.rewards=[{name: temporal_flicker}]",
            "grpo.pretrain_if_missing=null",
            "grpo.eval_interval=0",
            "grpo.decode_batch_size=2",
            "grpo.reward_ranks=1",
            "prompts.synthetic=false",
            f"prompts.prompts={prompts}",
            "sample.num_frames=5",
            "sample.height=32",
            "sample.width=32",
            "train.sample_at_end=false",
        ],
    )
    info = job.wait_for_end()
    log = job.log(0)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log, job.log(3, "err"))
    hosts = job.hosts(0)
    assert hosts[3] == hosts[2] != hosts[0], hosts  # the last rank, the reward rank, runs on the second node
    rows = lane.read_metrics(job.run_dir)
    assert sorted(rows) == [1, 2] and all("reward" in row for row in rows.values()), rows
    assert "over 3 data-parallel ranks" in log and "finished at iteration 2" in log, log
    assert [line.split()[2] for line in log.splitlines() if line.startswith("[grpo] step ")] == ["1/2", "2/2"]
