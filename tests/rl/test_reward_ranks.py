"""Reward models on ranks of their own: 2 policy ranks + 1 reward rank train exactly like 2 policy ranks that
score their own videos; a reward_ranks value that leaves no policy rank is refused naming the key."""

import json

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.rl.config import load_grpo_config

EXAMPLE = "examples/grpo_tiny.yaml"


def _job(rank, world_size, overrides):
    from osp_megatron.rl.cli import build_trainer
    from osp_megatron.rl.reward_ranks import RewardServer

    job = build_trainer(load_grpo_config(EXAMPLE, overrides))
    result = job.train()
    if isinstance(job, RewardServer):
        return "reward", result, {}
    return "policy", result, {name: p.detach().clone() for name, p in job.model.named_parameters()}


@pytest.mark.slow
def test_reward_ranks_give_the_local_rewards_update(tmp_path, grpo_overrides):
    """Two rewards, two iterations of 2 x 2 samples over 2 data-parallel policy ranks, and an evaluation whose
    single prompt leaves the second replica nothing to score: the same metrics and weights either way."""
    extra = [
        "grpo.rewards=[{name: temporal_flicker}, {name: synthetic_caption, weight: 0.5}]",
        "grpo.eval_interval=2",
        "grpo.eval_prompts=1",
    ]
    local = run_on_ranks(_job, 2, grpo_overrides(tmp_path / "local", steps=2, extra=extra))
    remote = run_on_ranks(_job, 3, grpo_overrides(tmp_path / "remote", steps=2, extra=[*extra, "grpo.reward_ranks=1"]))
    assert [r[0] for r in remote] == ["policy", "policy", "reward"]
    # Requests scored: two iterations of both replicas, two evaluations of replica 0 (replica 1's are empty rounds).
    assert remote[2][1]["step"] == 2 * 2 + 2
    rows = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("local", "remote")]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        for key in ("reward", "reward/synthetic_caption_mean", "advantage_std", "loss", "grad_norm", "eval_reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    for rank in range(2):
        for name, weight in local[rank][2].items():
            torch.testing.assert_close(remote[rank][2][name], weight, rtol=1e-6, atol=1e-9)


def test_reward_ranks_must_leave_policy_ranks():
    from osp_megatron.parallel.state import init_distributed

    with pytest.raises(ConfigError, match=r"grpo.reward_ranks=1 must .* smaller than the world size 1"):
        init_distributed(load_grpo_config(EXAMPLE).parallel, reserved_ranks=1)
    with pytest.raises(ConfigError, match="grpo.reward_ranks must be >= 0"):
        load_grpo_config(EXAMPLE, ["grpo.reward_ranks=-1"])
