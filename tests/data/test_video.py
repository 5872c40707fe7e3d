"""Tests of clip sampling from real MP4 files: the fps grid, time ranges, buckets, crops and bad files."""

import numpy as np
import pytest

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.buckets import Bucket, choose_bucket, cover_size, parse_buckets
from osp_megatron.data.video import VideoError, decode_clip, encode_clip, sample_clips
from osp_megatron.inference.video_io import write_video

BUCKETS = parse_buckets("64x64,64x96,96x64")


def _background_levels(clip):
    return clip[:, 2, 2].mean(axis=1)  # a corner pixel: the frame counter of moving_square_video


@pytest.fixture(scope="module")
def counter_video(tmp_path_factory):
    """24 frames at 12 fps, 64x96, whose background level is 4 x the frame number."""
    path = tmp_path_factory.mktemp("video") / "counter.mp4"
    frames = np.zeros((24, 64, 96, 3), np.uint8)
    for t in range(24):
        frames[t] = 4 * t
    write_video(str(path), frames, fps=12)
    return path


def test_clips_take_the_frame_nearest_each_grid_time(counter_video):
    """At 5 fps from a 12 fps source, grid time k/5 takes the source frame nearest 2.4 k."""
    clips = list(sample_clips(counter_video, fps=5, num_frames=5, buckets=BUCKETS))
    assert len(clips) == 2  # 2 s of video = 10 grid frames -> 2 whole clips of 5
    expected_frames = [0, 2, 5, 7, 10, 12, 14, 17, 19, 22]
    levels = np.concatenate([_background_levels(clip) for _, _, clip in clips])
    np.testing.assert_allclose(levels, 4 * np.array(expected_frames), atol=3)
    assert [round(start, 3) for _, start, _ in clips] == [0.0, 1.0]
    assert all(bucket == Bucket(64, 96) and clip.shape == (5, 64, 96, 3) for bucket, _, clip in clips)


def test_start_end_and_max_clips_limit_the_clips(counter_video):
    """start/end cut the video before clipping; max_clips stops early; the grid starts at `start`."""
    clips = list(sample_clips(counter_video, 5, 5, BUCKETS, start=0.5, end=1.5))
    assert len(clips) == 1
    np.testing.assert_allclose(_background_levels(clips[0][2]), 4 * np.array([6, 8, 11, 13, 16]), atol=3)
    assert len(list(sample_clips(counter_video, 8, 5, BUCKETS, max_clips=2))) == 2


def test_native_fps_overrides_container_timing(counter_video):
    """With fps=24 declared for the 12 fps file, frame i sits at i/24 s: 8 fps takes every third frame."""
    _, _, clip = next(sample_clips(counter_video, 8, 5, BUCKETS, native_fps=24))
    np.testing.assert_allclose(_background_levels(clip), 4 * np.array([0, 3, 6, 9, 12]), atol=3)


def test_too_short_and_unreadable_files_raise_video_errors(tmp_path, counter_video):
    """Each unusable file raises VideoError with its kind: too short, or unreadable (zero-byte, corrupt, cut)."""
    with pytest.raises(VideoError, match="2.00 s of video.*81 frames") as info:
        list(sample_clips(counter_video, 16, 81, BUCKETS))
    assert info.value.kind == "too short"
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "cut.mp4").write_bytes(counter_video.read_bytes()[:1500])
    for name in ("empty.mp4", "noise.mp4", "cut.mp4"):
        with pytest.raises(VideoError) as info:
            list(sample_clips(tmp_path / name, 8, 5, BUCKETS))
        assert info.value.kind in ("unreadable video", "truncated video")


def test_buckets_parse_choose_and_cover():
    """Resolution classes expand to landscape and portrait; the nearest aspect wins, without upscaling."""
    assert parse_buckets("480P") == [Bucket(480, 832), Bucket(832, 480)]
    assert [b.name for b in parse_buckets(["720P", "64x64"])] == ["64x64", "720x1280", "1280x720"]
    with pytest.raises(ConfigError, match="multiples of 16"):
        parse_buckets("100x64")
    with pytest.raises(ConfigError, match="neither"):
        parse_buckets("480p,big")
    buckets = parse_buckets("480P,720P")
    assert choose_bucket(buckets, 1080, 1920) == Bucket(720, 1280)  # largest landscape that fits
    assert choose_bucket(buckets, 600, 1000) == Bucket(480, 832)  # 720P would upscale
    assert choose_bucket(buckets, 240, 426) == Bucket(480, 832)  # everything upscales: the smallest
    assert choose_bucket(buckets, 1920, 1080) == Bucket(1280, 720)
    assert cover_size(72, 128, Bucket(64, 96)) == (64, 114)


def test_clip_bytes_round_trip():
    """encode_clip writes an MP4 that decode_clip reads back with its frame count and size."""
    frames = np.random.default_rng(1).integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    assert decode_clip(encode_clip(frames, 8)).shape == (5, 32, 48, 3)
    with pytest.raises(VideoError):
        decode_clip(b"not an mp4")
