"""Video decoding for data preparation: clips sampled on a fixed fps grid, resized and center-cropped to a bucket.

PyAV decodes in one pass per video; clips travel from `osp-data build` to `osp-data encode` as MP4 bytes.
"""

import io
import os
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
import torch

from osp_megatron.data.buckets import Bucket, center_crop_box, choose_bucket, cover_size

_CODECS = ("libx264", "mpeg4")


class VideoError(Exception):
    """A video that cannot be used; `kind` is 'unreadable video', 'truncated video' or 'too short'."""

    def __init__(self, message: str, kind: str = "unreadable video", clips_done: int = 0):
        super().__init__(message)
        self.kind, self.clips_done = kind, clips_done


def probe(path: str) -> tuple[int, int]:
    """(height, width) of the first video stream; VideoError when the file is no readable video."""
    if os.path.getsize(path) == 0:  # FFmpeg calls it "invalid data", as for a corrupt file
        raise VideoError("is an empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("holds no video stream")
            stream = container.streams.video[0]
            height, width = stream.codec_context.height, stream.codec_context.width
    except av.error.FFmpegError as exc:
        raise VideoError(f"cannot be opened ({_reason(exc)})") from exc
    if not height or not width:
        raise VideoError("reports no frame size")
    return height, width


def _reason(exc):
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _FrameResizer:
    """Converts decoded frames to RGB at the bucket size: scale to cover, then center-crop."""

    def __init__(self, height, width, bucket):
        self.bucket = bucket
        self.scaled = cover_size(height, width, bucket)
        self.top, self.left = center_crop_box(*self.scaled, bucket)
        self._last = (None, None)

    def __call__(self, frame):
        if self._last[0] is frame:  # a frame chosen for several grid times (source fps below the target)
            return self._last[1]
        scaled_height, scaled_width = self.scaled
        pixels = frame.reformat(
            width=scaled_width, height=scaled_height, format="rgb24", interpolation="AREA"
        ).to_ndarray()
        out = pixels[self.top : self.top + self.bucket.height, self.left : self.left + self.bucket.width]
        self._last = (frame, np.ascontiguousarray(out))
        return self._last[1]


def _grid_frames(decoded, fps, start, end, native_fps, frame_duration, grid):
    """Yield, for grid times start + k / fps (k = 0, 1, ...), the decoded frame nearest to each.

    decoded: frames in display order. grid["start"] is set to the grid's start (the first frame's time when
    start is None) and grid["seen"] follows the seconds of video decoded from there.
    """
    previous = None  # (time, frame) of the last decoded frame
    k = 0
    for index, frame in enumerate(decoded):
        time = index / native_fps if native_fps else (frame.time if frame.time is not None else index * frame_duration)
        if start is None:
            start = time
        grid["start"], grid["seen"] = start, time + frame_duration - start
        while (end is None or start + k / fps < end) and start + k / fps <= time:
            target = start + k / fps
            yield previous[1] if previous and target - previous[0] <= time - target else frame
            k += 1
        if end is not None and start + k / fps >= end:
            return
        previous = (time, frame)
    # The last frame is shown until one frame duration after its timestamp.
    while (
        previous is not None
        and start + k / fps < previous[0] + frame_duration
        and (end is None or start + k / fps < end)
    ):
        yield previous[1]
        k += 1


def sample_clips(
    path: str,
    fps: float,
    num_frames: int,
    buckets: list[Bucket],
    start: float | None = None,
    end: float | None = None,
    native_fps: float | None = None,
    max_clips: int = 0,
) -> Iterator[tuple[Bucket, float, np.ndarray]]:
    """Yield (bucket, clip start in seconds, uint8 frames [num_frames, H, W, 3]) for consecutive clips.

    Frames sit on the grid start + k / fps (k = 0, 1, ...; start defaults to the first frame's time); each
    grid time takes the decoded frame nearest to it, and clip c holds grid points [c num_frames, (c + 1)
    num_frames). A clip that the video (or `end`) cuts short is dropped. native_fps overrides the container's
    timestamps (frame i is at i / native_fps). Raises VideoError for unusable videos; a decode failure after
    some clips raises one whose `clips_done` tells how many were yielded.
    """
    height, width = probe(path)
    bucket = choose_bucket(buckets, height, width)
    resize = _FrameResizer(height, width, bucket)
    done, clip, grid = 0, [], {"start": start or 0.0, "seen": 0.0}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frame_duration = 1.0 / float(native_fps or stream.average_rate or stream.guessed_rate or fps)
            decoded = container.decode(stream)
            for frame in _grid_frames(decoded, fps, start, end, native_fps, frame_duration, grid):
                clip.append(resize(frame))
                if len(clip) == num_frames:
                    yield bucket, grid["start"] + done * num_frames / fps, np.stack(clip)
                    done, clip = done + 1, []
                    if max_clips and done >= max_clips:
                        return
    except av.error.FFmpegError as exc:
        raise VideoError(
            f"decoding failed after {done} clip(s) ({_reason(exc)}); the file is truncated or corrupt",
            "truncated video" if done else "unreadable video",
            done,
        ) from exc
    if done == 0:
        raise VideoError(
            f"{grid['seen']:.2f} s of video from the clip start, a clip needs "
            f"{num_frames} frames at {fps:g} fps = {num_frames / fps:.2f} s",
            "too short",
        )


def _pick_codec():
    for name in _CODECS:
        if name in av.codecs_available:
            return name
    raise VideoError(f"this PyAV build has none of the video encoders {_CODECS}")


def encode_clip(frames: np.ndarray, fps: float, crf: int = 16) -> bytes:
    """uint8 frames [F, H, W, 3] (even H and W) -> MP4 bytes (H.264 at visually lossless quality)."""
    codec = _pick_codec()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "fast"}
        else:
            stream.codec_context.bit_rate = 20_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def decode_clip(data: bytes) -> np.ndarray:
    """MP4 bytes of a clip -> uint8 frames [F, H, W, 3]; VideoError when they do not decode."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise VideoError(f"clip does not decode ({_reason(exc)})") from exc
    if not frames:
        raise VideoError("clip holds no frames")
    return np.stack(frames)


def to_model_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> float tensor [3, F, H, W] in [-1, 1], as the VAE takes them."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)
