"""Temporal flicker reward, meaningful without any downloaded weights (VBench's temporal_flickering idea).

Score = 1 - mean |frame_t - frame_{t-1}| / 255: 1 for a still video, lower the more pixels jump between frames.
"""

import torch

from osp_megatron.rl.rewards.base import register_reward


@register_reward("temporal_flicker")
class TemporalFlicker:
    """1 - the mean absolute change between consecutive frames, in [0, 1]."""

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if videos.shape[1] < 2:
            return torch.ones(videos.shape[0])
        frames = videos.float()
        change = (frames[:, 1:] - frames[:, :-1]).abs().flatten(1).mean(dim=1)
        return 1.0 - change / 255.0
