"""A verifiable reward for the synthetic data set: does the video show the colour and the motion its caption
names? Measured from the pixels against the data set's own palette and renderer; no weights needed.
"""

import math

import numpy as np
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.rl.rewards.base import register_reward


def caption_words(prompt: str) -> tuple[str, str]:
    """(colour, motion) named by a synthetic caption such as 'a red circle moving left'."""
    from osp_megatron.data.synthetic import COLOURS, MOTIONS

    colours = [c for c in COLOURS if f" {c} " in f" {prompt} "]
    motions = [m for m in MOTIONS if prompt.rstrip().endswith(m)]
    if len(colours) != 1 or len(motions) != 1:
        raise ConfigError(
            f"reward synthetic_caption: prompt {prompt!r} is not a synthetic caption naming one "
            f"colour of {COLOURS} and ending in one motion of {MOTIONS}"
        )
    return colours[0], motions[0]


def centre_travel(centres: np.ndarray) -> np.ndarray | None:
    """Displacement (x, y) between the first and last frame where a shape was found; None with fewer than two."""
    found = np.flatnonzero(~np.isnan(centres).any(axis=1))
    if len(found) < 2:
        return None
    return centres[found[-1]] - centres[found[0]]


@register_reward("synthetic_caption")
class SyntheticCaptionReward:
    """Mean of a colour score exp(-|rgb - palette colour| / colour_scale) (RGB units, of the shape's pixels)
    and a motion score exp(-|travel - rendered travel| / motion_scale) (fractions of the frame), in [0, 1]."""

    def __init__(
        self,
        colour_scale: float = 60.0,
        motion_scale: float = 0.15,
        colour_weight: float = 1.0,
        motion_weight: float = 1.0,
    ):
        if (
            min(colour_scale, motion_scale) <= 0
            or min(colour_weight, motion_weight) < 0
            or colour_weight + motion_weight <= 0
        ):
            raise ConfigError("reward synthetic_caption: scales must be > 0 and weights >= 0 with a positive sum")
        self.colour_scale, self.motion_scale = colour_scale, motion_scale
        self.colour_weight, self.motion_weight = colour_weight, motion_weight

    def parts(self, video: np.ndarray, prompt: str) -> tuple[float, float]:
        """(colour score, motion score) of one uint8 video [T, H, W, 3]."""
        from osp_megatron.data.synthetic import COLOUR_RGB, blob_centres, measure_blob

        colour, motion = caption_words(prompt)
        measured = measure_blob(video)
        colour_error = float(np.linalg.norm(np.asarray(measured.rgb) - np.asarray(COLOUR_RGB[colour], dtype=float)))
        expected = blob_centres(motion, len(video))
        travel = centre_travel(measured.centres)
        motion_score = 0.0
        if travel is not None:
            error = float(np.linalg.norm(travel - (expected[-1] - expected[0])))
            motion_score = math.exp(-error / self.motion_scale)
        return math.exp(-colour_error / self.colour_scale), motion_score

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = []
        for video, prompt in zip(videos.cpu().numpy(), prompts):
            colour, motion = self.parts(video, prompt)
            scores.append(
                (self.colour_weight * colour + self.motion_weight * motion) / (self.colour_weight + self.motion_weight)
            )
        return torch.tensor(scores, dtype=torch.float32)
