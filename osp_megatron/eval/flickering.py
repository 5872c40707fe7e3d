"""VBench's temporal flickering, computed directly (it needs no model weights).

Per video: 1 - mean |frame_{i+1} - frame_i| / 255 over all pixels and channels of the decoded 8-bit frames;
the dimension's raw score is the mean over the videos.
"""

import numpy as np

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.video_io import read_video


def frame_flicker_score(frames) -> float:
    """(255 - mean absolute difference of consecutive uint8 frames [F, H, W, 3]) / 255, in [0, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ConfigError(f"temporal flickering needs at least two frames [F, H, W, C], got shape {frames.shape}")
    differences = np.abs(np.diff(frames.astype(np.float32), axis=0))
    per_pair = differences.reshape(differences.shape[0], -1).mean(axis=1)
    return float((255.0 - per_pair.mean()) / 255.0)


def temporal_flickering(video_paths) -> tuple[float, list[dict]]:
    """(mean score, [{video_path, video_results}]) over decoded videos, in VBench's result layout."""
    if not video_paths:
        raise ConfigError("temporal flickering needs at least one video")
    per_video = [
        {"video_path": str(path), "video_results": frame_flicker_score(read_video(str(path)).numpy())}
        for path in video_paths
    ]
    return float(np.mean([item["video_results"] for item in per_video])), per_video
