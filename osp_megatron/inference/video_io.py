"""Write generated videos to .mp4 (and a PNG strip of their frames) and read them back, with PyAV.

H.264 (libx264) when this PyAV build has it, MPEG-4 Part 2 otherwise; writes are atomic.
"""

import os
from fractions import Fraction

import av
import numpy as np
import torch

from osp_megatron.config.errors import ConfigError

_CODECS = ("libx264", "mpeg4")


def to_uint8_frames(frames):
    """uint8 [F, H, W, 3] (array or tensor) or float tensor [3, F, H, W] in [-1, 1] -> uint8 array [F, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            frames = frames.cpu().numpy()
        else:
            if frames.ndim != 4 or frames.shape[0] != 3:
                raise ConfigError(f"a float video must be [3, F, H, W] in [-1, 1], got shape {tuple(frames.shape)}")
            pixels = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            frames = pixels.permute(1, 2, 3, 0).numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError(
            f"video frames must be uint8 [F, H, W, 3] or a float tensor [3, F, H, W], got {frames.dtype} "
            f"{tuple(frames.shape)}"
        )
    return frames


def _pad_to_even(frames):
    """4:2:0 chroma needs even sizes; the last row and column are repeated rather than the video rescaled."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _pick_codec():
    for name in _CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise ConfigError(f"this PyAV build has none of the video encoders {_CODECS}")


def write_video(path, frames, fps=16, codec=None):
    """Encode frames (see to_uint8_frames) to the .mp4 file `path`, padded to even height and width."""
    frames = _pad_to_even(to_uint8_frames(frames))
    if frames.shape[0] == 0:
        raise ConfigError(f"{path}: cannot write a video with no frames")
    if fps <= 0:
        raise ConfigError(f"{path}: fps must be positive, got {fps}")
    codec = codec or _pick_codec()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "16", "preset": "medium"}
            else:
                stream.codec_context.bit_rate = 20_000_000
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def frame_strip(frames, max_frames=9, gap=2):
    """uint8 [H, n W + (n - 1) gap, 3]: up to `max_frames` evenly spaced frames side by side on white."""
    frames = to_uint8_frames(frames)
    if frames.shape[0] == 0:
        raise ConfigError("cannot make a frame strip of a video with no frames")
    count = min(max_frames, frames.shape[0])
    picks = np.linspace(0, frames.shape[0] - 1, count).round().astype(int)
    height, width = frames.shape[1:3]
    strip = np.full((height, count * width + (count - 1) * gap, 3), 255, dtype=np.uint8)
    for slot, index in enumerate(picks):
        strip[:, slot * (width + gap) : slot * (width + gap) + width] = frames[index]
    return strip


def write_frame_strip(path, frames, max_frames=9):
    """Write frame_strip(frames) as a PNG (atomically); returns the path."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        Image.fromarray(frame_strip(frames, max_frames)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_frames(folder, frames):
    """Every frame as <folder>/00000.png, 00001.png, ...; returns the folder."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for index, frame in enumerate(to_uint8_frames(frames)):
        Image.fromarray(frame).save(os.path.join(folder, f"{index:05d}.png"), format="PNG")
    return folder


def read_video(path):
    """Decode every frame of a video file -> uint8 tensor [F, H, W, 3] (RGB)."""
    if not os.path.isfile(path):
        raise ConfigError(f"video file {path} does not exist")
    try:
        with av.open(path) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise ConfigError(f"video file {path} cannot be decoded ({exc}); it is corrupt or not a video") from exc
    if not frames:
        raise ConfigError(f"video file {path} holds no video frames")
    return torch.from_numpy(np.stack(frames))
