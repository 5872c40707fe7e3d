"""The reward interface: videos uint8 [B, T, H, W, 3] plus their prompts -> scores [B] (higher is better).

Rewards are built by name from the `grpo.rewards` list; every other key of an entry goes to the reward.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from osp_megatron.config.errors import ConfigError


class Reward(Protocol):
    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """videos: uint8 [B, T, H, W, 3]; prompts: B strings -> float32 scores [B]."""


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str):
    """Class or factory decorator: `grpo.rewards: [{name: <name>, ...}]` builds it with the other keys."""

    def decorate(factory):
        _REGISTRY[name] = factory
        return factory

    return decorate


def reward_names() -> list[str]:
    """Registered rewards: the built-ins (registered when the osp_megatron.rl.rewards package is imported, which
    importing this module does first) and any a user registered."""
    return sorted(_REGISTRY)


@dataclass
class WeightedReward:
    name: str
    weight: float
    function: Reward | None  # None where the reward runs on reward ranks


def _name_and_weight(i: int, entry: dict) -> tuple[str, float]:
    name, weight = entry.get("name"), entry.get("weight", 1.0)
    if name not in _REGISTRY:
        raise ConfigError(
            f"grpo.rewards[{i}].name={name!r} is not a known reward; choose one of {', '.join(reward_names())}"
        )
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"grpo.rewards[{i}].weight must be a number, got {weight!r}")
    return name, float(weight)


def reward_weights(entries: list[dict]) -> list[WeightedReward]:
    """The names and weights of `grpo.rewards` without building the rewards (function None): what ranks that
    send their videos to reward ranks need for advantages and logging."""
    weighted = [WeightedReward(*_name_and_weight(i, entry), None) for i, entry in enumerate(entries)]
    if len({r.name for r in weighted}) != len(weighted):
        raise ConfigError("grpo.rewards lists a reward name twice; give each reward once with its weight")
    return weighted


def build_rewards(entries: list[dict], device="cpu", video_fps: float = 16.0) -> list[WeightedReward]:
    """One WeightedReward per `grpo.rewards` entry; unknown names and options raise ConfigError naming them.

    Rewards that take `device` or `video_fps` (the frame rate of the scored videos, sample.fps) get them from
    the job, not from their entry."""
    context = {"device": device, "video_fps": video_fps}
    built = []
    for i, (entry, weighted) in enumerate(zip(entries, reward_weights(entries))):
        where = f"grpo.rewards[{i}]"
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        factory = _REGISTRY[weighted.name]
        accepted = inspect.signature(factory).parameters
        for key in options:
            if key not in accepted or key in context:
                allowed = ", ".join(k for k in accepted if k not in context) or "none"
                raise ConfigError(
                    f"unknown config key '{where}.{key}' for reward {weighted.name!r}; allowed: {allowed}"
                )
        options.update({key: value for key, value in context.items() if key in accepted})
        try:
            function = factory(**options)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        built.append(WeightedReward(weighted.name, weighted.weight, function))
    return built


def score_videos(rewards: list[WeightedReward], videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Scores [B, number of rewards] (float32) of uint8 videos [B, T, H, W, 3]."""
    columns = []
    for reward in rewards:
        scores = torch.as_tensor(reward.function(videos, prompts), dtype=torch.float32).reshape(-1)
        if scores.shape[0] != videos.shape[0]:
            raise ValueError(f"reward {reward.name!r} returned {scores.shape[0]} scores for {videos.shape[0]} videos")
        columns.append(scores.cpu())
    return torch.stack(columns, dim=1)


def to_uint8_frames(videos: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3], the reward interface's layout."""
    return ((videos.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()
