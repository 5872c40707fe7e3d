"""Rewards for GRPO: one interface (videos + prompts -> scores), built-ins and learned-reward adapters."""

from osp_megatron.rl.rewards import clip, synthetic, temporal, videoalign  # noqa: F401,E402  (register the built-ins)
from osp_megatron.rl.rewards.base import (  # noqa: F401
    Reward,
    WeightedReward,
    build_rewards,
    register_reward,
    reward_names,
    reward_weights,
    score_videos,
    to_uint8_frames,
)
