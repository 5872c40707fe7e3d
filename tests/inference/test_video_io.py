"""Tests of .mp4 writing and reading: round trip, input layouts, even-size padding and clear errors.

Content is smooth so that lossy coding stays within a few grey levels.
"""

import numpy as np
import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.video_io import read_video, to_uint8_frames, write_video


def _smooth_video(frames=9, height=32, width=48):
    """A float video [3, F, H, W] in [-1, 1] made of slow gradients."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    return 0.8 * torch.stack([torch.sin(2 * x + t + 0 * y), torch.cos(2 * y + t + 0 * x), (x * y + t - 0.5) / 1.5])


def test_float_video_round_trips_through_mp4(tmp_path):
    """A [3, F, H, W] float video comes back as uint8 [F, H, W, 3] close to the original pixels."""
    video = _smooth_video()
    path = write_video(str(tmp_path / "clip.mp4"), video, fps=8)
    frames = read_video(path)
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == torch.uint8
    error = (frames.float() - torch.from_numpy(to_uint8_frames(video)).float()).abs().mean()
    assert error < 8
    assert not [p for p in tmp_path.iterdir() if p.name != "clip.mp4"]


def test_uint8_frames_and_odd_sizes_are_padded_to_even(tmp_path):
    """uint8 [F, H, W, 3] input of odd size is written padded by one row and column, content kept."""
    frames = to_uint8_frames(_smooth_video(5, 17, 23))
    assert frames.shape == (5, 17, 23, 3)
    back = read_video(write_video(str(tmp_path / "sub" / "odd.mp4"), frames, fps=4))
    assert back.shape == (5, 18, 24, 3)
    assert (back[:, :17, :23].float() - torch.from_numpy(frames).float()).abs().mean() < 8


def test_mpeg4_fallback_codec_writes_a_readable_file(tmp_path):
    """The MPEG-4 encoder used when H.264 is missing also round-trips."""
    video = _smooth_video(5, 16, 16)
    back = read_video(write_video(str(tmp_path / "m.mp4"), video, fps=8, codec="mpeg4"))
    assert back.shape == (5, 16, 16, 3)


def test_missing_and_corrupt_files_are_config_errors(tmp_path):
    """Reading a missing file or a non-video names the path."""
    with pytest.raises(ConfigError, match="absent.mp4.*does not exist"):
        read_video(str(tmp_path / "absent.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ConfigError, match="bad.mp4.*cannot be decoded"):
        read_video(str(bad))


def test_bad_frame_layouts_are_rejected():
    """Float input must be [3, F, H, W]; arrays must be uint8 [F, H, W, 3]."""
    with pytest.raises(ConfigError, match=r"\[3, F, H, W\]"):
        to_uint8_frames(torch.zeros(4, 5, 8, 8))
    with pytest.raises(ConfigError, match="uint8"):
        to_uint8_frames(np.zeros((5, 8, 8, 3), dtype=np.float32))


def test_frame_strip_places_evenly_spaced_frames(tmp_path):
    """A strip of a 9-frame video holds frames 0, 4 and 8 side by side with white gaps; the PNG reads back."""
    import numpy as np
    from PIL import Image

    from osp_megatron.inference.video_io import frame_strip, write_frame_strip

    frames = np.zeros((9, 4, 5, 3), dtype=np.uint8)
    for i in range(9):
        frames[i] = i * 10
    strip = frame_strip(frames, max_frames=3, gap=2)
    assert strip.shape == (4, 3 * 5 + 2 * 2, 3)
    assert [int(strip[0, x, 0]) for x in (0, 7, 14)] == [0, 40, 80]
    assert int(strip[0, 5, 0]) == 255
    path = write_frame_strip(str(tmp_path / "s.png"), frames, max_frames=3)
    assert np.array_equal(np.asarray(Image.open(path)), frame_strip(frames, max_frames=3))
