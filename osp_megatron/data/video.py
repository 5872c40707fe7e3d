"""Video decoding for data preparation: clips sampled on a fixed fps grid, resized and center-cropped to a bucket.

PyAV decodes in one pass per video; clips travel from `osp-data build` to `osp-data encode` as MP4 bytes.
"""

import io
from fractions import Fraction

import av
import numpy as np
import torch

from osp_megatron.data.buckets import center_crop_box, choose_bucket, cover_size

_CODECS = ("libx264", "mpeg4")


class VideoError(Exception):
    """A video that cannot be used; `kind` is 'unreadable video', 'truncated video' or 'too short'."""

    def __init__(self, message, kind="unreadable video", clips_done=0):
        super().__init__(message)
        self.kind, self.clips_done = kind, clips_done


def probe(path):
    """(height, width) of the first video stream; VideoError when the file is no readable video."""
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
        pixels = frame.reformat(width=scaled_width, height=scaled_height, format="rgb24",
                                interpolation="AREA").to_ndarray()
        out = pixels[self.top:self.top + self.bucket.height, self.left:self.left + self.bucket.width]
        self._last = (frame, np.ascontiguousarray(out))
        return self._last[1]


def sample_clips(path, fps, num_frames, buckets, start=None, end=None, native_fps=None, max_clips=0):
    """Yield (bucket, clip start in seconds, uint8 frames [num_frames, H, W, 3]) for consecutive clips.

    Frames sit on the grid start + k / fps (k = 0, 1, ...); each grid time takes the decoded frame nearest to
    it, and clip c holds grid points [c num_frames, (c + 1) num_frames). A clip that the video (or `end`) cuts
    short is dropped. native_fps overrides the container's timestamps (frame i is at i / native_fps).
    Raises VideoError for unusable videos; a decode failure after some clips raises one whose `clips_done`
    tells how many were yielded.
    """
    height, width = probe(path)
    bucket = choose_bucket(buckets, height, width)
    resize = _FrameResizer(height, width, bucket)
    step = 1.0 / fps
    done = 0
    clip = []
    previous = None  # (time, frame) of the last decoded frame
    grid_start = start
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frame_duration = 1.0 / float(native_fps or stream.average_rate or stream.guessed_rate or fps)
            for index, frame in enumerate(container.decode(stream)):
                time = index / native_fps if native_fps else (frame.time if frame.time is not None
                                                               else index * frame_duration)
                if grid_start is None:
                    grid_start = time
                if time < grid_start - frame_duration:
                    previous = (time, frame)
                    continue
                while True:
                    target = grid_start + (done * num_frames + len(clip)) * step
                    if target > time or (end is not None and target >= end):
                        break
                    near = previous if previous and target - previous[0] <= time - target else (time, frame)
                    clip.append(resize(near[1]))
                    if len(clip) == num_frames:
                        yield bucket, grid_start + done * num_frames * step, np.stack(clip)
                        done, clip = done + 1, []
                        if max_clips and done >= max_clips:
                            return
                if end is not None and grid_start + (done * num_frames + len(clip)) * step >= end:
                    break
                previous = (time, frame)
            # The last frame is shown until one frame duration after its timestamp.
            while previous is not None:
                target = grid_start + (done * num_frames + len(clip)) * step
                if target >= previous[0] + frame_duration or (end is not None and target >= end):
                    break
                clip.append(resize(previous[1]))
                if len(clip) == num_frames:
                    yield bucket, grid_start + done * num_frames * step, np.stack(clip)
                    done, clip = done + 1, []
                    if max_clips and done >= max_clips:
                        return
    except av.error.FFmpegError as exc:
        raise VideoError(f"decoding failed after {done} clip(s) ({_reason(exc)}); the file is truncated or corrupt",
                         "truncated video" if done else "unreadable video", done) from exc
    if done == 0:
        seen = 0.0 if previous is None or grid_start is None else previous[0] + frame_duration - grid_start
        raise VideoError(f"{seen:.2f} s of video from the clip start, a clip needs "
                         f"{num_frames} frames at {fps:g} fps = {num_frames / fps:.2f} s", "too short")


def _pick_codec():
    for name in _CODECS:
        if name in av.codecs_available:
            return name
    raise VideoError(f"this PyAV build has none of the video encoders {_CODECS}")


def encode_clip(frames, fps, crf=16):
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


def decode_clip(data):
    """MP4 bytes of a clip -> uint8 frames [F, H, W, 3]; VideoError when they do not decode."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise VideoError(f"clip does not decode ({_reason(exc)})") from exc
    if not frames:
        raise VideoError("clip holds no frames")
    return np.stack(frames)


def to_model_input(frames):
    """uint8 frames [F, H, W, 3] -> float tensor [3, F, H, W] in [-1, 1], as the VAE takes them."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)
