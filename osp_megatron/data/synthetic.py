"""A learnable synthetic text-to-video data set, written as real webdataset shards, and the pictures it shows.

Captions name a colour, a shape and a motion; the video (rendered pixels, or an analytic latent) follows from them.
"""

import io
import itertools
import json
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import webdataset

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.shards import INDEX_NAME, ShardInfo, atomic_write_bytes, read_index, write_index

INDEX_FORMAT = "osp-synthetic-v3"
# Written first into every folder this generator fills; nothing without it is ever written to or deleted.
MARKER_NAME = ".osp-synthetic"
SYNTHETIC_VAES = ("tiny-random", "tiny-block")
# Caption videos rendered and encoded at once by the tiny block VAE.
_ENCODE_BATCH = 8
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "wide bar", "tall bar")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "staying still")
# Per latent frame the blob travels this fraction of the frame; the start is chosen so it stays inside.
_TRAVEL = 0.4
_VELOCITY = {
    "moving left": (-1, 0),
    "moving right": (1, 0),
    "moving up": (0, -1),
    "moving down": (0, 1),
    "staying still": (0, 0),
}
NOISE_STD = 0.05
BLOB_AMPLITUDE = 2.0


# The palette: every colour word's pixel value, on a dark background that every colour stands out from (white
# included). Reward models and tests judge rendered and generated videos against these values.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 50, 210),
    "white": (235, 235, 235),
}
# The background's colour at the frame's centre. Its red rises by BACKGROUND_SHADE from the left edge to the right
# and its blue from the top edge to the bottom, like the sky and ground of real footage: the DiT's 3D RoPE is
# relative, so this shading is what tells it where in the frame a caption's path lies.
BACKGROUND_RGB = (30, 20, 30)
BACKGROUND_SHADE = 50


class CaptionTextEncoder(Protocol):
    """What the set needs of a text encoder (models.text_encoder.TextEncoder): states [N, len, text_dim], lengths."""

    text_dim: int

    def encode(self, captions: list[str]) -> tuple: ...


class CaptionVideoEncoder(Protocol):
    """What the set needs of a video VAE (models.block_vae's tiny block VAE): strides, and pixel videos
    [N, 3, T, H, W] in [-1, 1] to latents [N, C, t, h, w]."""

    latent_channels: int
    temporal_stride: int
    spatial_stride: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...


# Half extents (x, y) of each shape as fractions of the frame width and height.
_SHAPE_HALF_SIZE = {"circle": (0.15, 0.15), "square": (0.14, 0.14), "wide bar": (0.28, 0.08), "tall bar": (0.08, 0.28)}


def blob_centres(motion: str, num_frames: int) -> np.ndarray:
    """Centre (x, y) per frame as fractions of the frame, x to the right and y downwards: [num_frames, 2]."""
    dx, dy = _VELOCITY[motion]
    progress = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.full(1, 0.5)
    travel = _TRAVEL * (progress - 0.5)
    return np.stack([0.5 + dx * travel, 0.5 + dy * travel], axis=1)


def background_image(height: int, width: int) -> np.ndarray:
    """The shaded background of the caption videos, float64 [height, width, 3] in pixel values."""
    xs = (np.arange(width, dtype=np.float64) + 0.5) / width - 0.5
    ys = (np.arange(height, dtype=np.float64) + 0.5) / height - 0.5
    image = np.empty((height, width, 3))
    image[:] = BACKGROUND_RGB
    image[..., 0] += BACKGROUND_SHADE * xs[None, :]
    image[..., 2] += BACKGROUND_SHADE * ys[:, None]
    return image


def render_caption_video(colour: str, shape: str, motion: str, num_frames: int, height: int, width: int) -> np.ndarray:
    """The pixel video a caption describes, uint8 [num_frames, height, width, 3].

    A shape of the palette colour over the shaded background (background_image) whose centre travels _TRAVEL of
    the frame from the first to the last frame in the motion's direction (centred for "staying still"); edges are
    anti-aliased over one pixel so that a small VAE can reproduce them.
    """
    for word, allowed in ((colour, COLOUR_RGB), (shape, _SHAPE_HALF_SIZE), (motion, _VELOCITY)):
        if word not in allowed:
            raise ConfigError(f"synthetic caption word {word!r} is not one of {', '.join(allowed)}")
    if min(num_frames, height, width) < 1:
        raise ConfigError(f"synthetic video size must be positive, got {num_frames} x {height} x {width}")
    centres = blob_centres(motion, num_frames)
    # Pixel-centre coordinates in pixels; distances to the shape's centre per frame: [T, H, W].
    ys = np.arange(height, dtype=np.float64)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, None, :] + 0.5
    dx = xs - centres[:, 0, None, None] * width
    dy = ys - centres[:, 1, None, None] * height
    half_x, half_y = _SHAPE_HALF_SIZE[shape]
    half_x, half_y = half_x * width, half_y * height
    if shape == "circle":
        # An ellipse in pixels (a circle on square frames); the signed edge distance is scaled to pixels.
        radius = np.sqrt((dx / half_x) ** 2 + (dy / half_y) ** 2)
        coverage = np.clip(0.5 + (1 - radius) * min(half_x, half_y), 0, 1)
    else:
        coverage = np.clip(0.5 + half_x - np.abs(dx), 0, 1) * np.clip(0.5 + half_y - np.abs(dy), 0, 1)
    background = background_image(height, width)[None]
    foreground = np.array(COLOUR_RGB[colour], dtype=np.float64)
    video = background + coverage[..., None] * (foreground - background)
    return np.round(video).astype(np.uint8)


@dataclass(frozen=True)
class BlobMeasurement:
    """What a video shows: the mean colour of its shape, the nearest palette word, the shape's centre per frame."""

    rgb: tuple[float, float, float]
    colour: str
    centres: np.ndarray  # [T, 2]: (x, y) as fractions of the frame, x to the right and y downwards
    mask: np.ndarray  # [T, H, W] bool: the shape's pixels per frame

    def motion(self, min_travel: float = 0.1) -> str:
        """The motion word whose direction the centre travelled most along (staying still below min_travel)."""
        travel = self.centres[-1] - self.centres[0]
        if np.abs(travel).max() < min_travel:
            return "staying still"
        return max(_VELOCITY, key=lambda word: float(np.dot(_VELOCITY[word], travel)))

    def shape(self) -> str | None:
        """The shape word of the middle frame's shape: a bar when its bounding box is over twice as long one way
        as the other, else a square when it fills over 88 % of that box (a disc fills 79 %), else a circle;
        None when the middle frame shows no shape."""
        mask = self.mask[len(self.mask) // 2]
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            return None
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        if width > 2 * height:
            return "wide bar"
        if height > 2 * width:
            return "tall bar"
        return "square" if mask.sum() / (width * height) > 0.88 else "circle"


def measure_blob(video: np.ndarray) -> BlobMeasurement:
    """Locate the shape in a uint8 video [T, H, W, 3] over the shaded background (rendered or generated).

    Per frame the shape is the pixels at least half as far from the background colour as the farthest one,
    which tolerates the blur and tint of a generated video; a frame with nothing far from the background
    (under 40 of 255) counts as shapeless and the centre is NaN there.
    """
    video = np.asarray(video, dtype=np.float64)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ConfigError(f"measure_blob expects a video [T, H, W, 3], got shape {video.shape}")
    background = background_image(*video.shape[1:3])
    distance = np.linalg.norm(video - background[None], axis=-1)  # [T, H, W]
    peak = distance.reshape(len(video), -1).max(axis=1)
    mask = (distance >= 0.5 * peak[:, None, None]) & (peak[:, None, None] >= 40)
    height, width = video.shape[1:3]
    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.full((len(video), 2), np.nan)
    for t in range(len(video)):
        if mask[t].any():
            centres[t] = ((xs[mask[t]].mean() + 0.5) / width, (ys[mask[t]].mean() + 0.5) / height)
    rgb = video[mask].mean(axis=0) if mask.any() else np.array(BACKGROUND_RGB, dtype=np.float64)
    nearest = min(COLOUR_RGB, key=lambda word: float(np.linalg.norm(rgb - np.array(COLOUR_RGB[word]))))
    return BlobMeasurement(tuple(float(v) for v in rgb), nearest, centres, mask)


def caption_of(colour: str, shape: str, motion: str) -> str:
    return f"a {colour} {shape} {motion}"


def all_captions() -> list[str]:
    """Every caption the synthetic data set can contain, in a fixed order."""
    return [caption_of(*words) for words in itertools.product(COLOURS, SHAPES, MOTIONS)]


def colour_pattern(colour: str, channels: int) -> np.ndarray:
    """A fixed unit-RMS channel vector per colour; independent of the seed so every data set agrees."""
    rng = np.random.default_rng(1000 + COLOURS.index(colour))
    pattern = rng.standard_normal(channels)
    return pattern / np.sqrt(np.mean(pattern**2))


def blob_latent(colour: str, shape: str, motion: str, latent_shape: tuple[int, int, int, int]) -> np.ndarray:
    """The noise-free latent [C, T, H, W] of a caption: a blob of the colour's channel pattern in motion."""
    channels, frames, height, width = latent_shape
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    sigma_x, sigma_y = {
        "circle": (0.15, 0.15),
        "square": (0.15, 0.15),
        "wide bar": (0.3, 0.08),
        "tall bar": (0.08, 0.3),
    }[shape]
    latent = np.zeros(latent_shape, dtype=np.float32)
    pattern = colour_pattern(colour, channels)[:, None, None]
    for t, (cx, cy) in enumerate(blob_centres(motion, frames)):
        ux, uy = (xx - cx) / sigma_x, (yy - cy) / sigma_y
        if shape == "square":
            # A soft-edged box, so squares and circles differ in profile, not just in size.
            profile = 1 / (1 + np.exp(8 * (np.abs(ux) - 1))) / (1 + np.exp(8 * (np.abs(uy) - 1)))
        else:
            profile = np.exp(-0.5 * (ux**2 + uy**2))
        latent[:, t] = BLOB_AMPLITUDE * pattern * profile[None]
    return latent


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _expected_index(num_samples, samples_per_shard, latent_shape, text_len, text_dim, seed, vae, held_out):
    expected = {
        "format": INDEX_FORMAT,
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "latent_shape": list(latent_shape),
        "text_len": text_len,
        "text_dim": text_dim,
        "seed": seed,
        "vae": vae,
    }
    if held_out:
        expected["held_out"] = True
    return expected


def _is_own_temporary(name):
    """Files atomic_write_bytes leaves behind when a generator is killed mid-write."""
    return (
        name.startswith(".")
        and ".tmp-" in name
        and (name[1:].startswith("shard-") or name[1:].startswith(INDEX_NAME) or name[1:].startswith(MARKER_NAME))
    )


def _read_marker(out_dir, key):
    path = os.path.join(out_dir, MARKER_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: unreadable synthetic data marker ({exc}); delete the folder {out_dir} (it "
            f"holds generated data only) or choose another {key}"
        ) from exc


def _claim_folder(out_dir, expected, key="data.path"):
    """Decide whether out_dir may receive this synthetic set; returns its shards when it already holds it whole.

    Writes only into an absent or empty folder (leaving the marker first) or one whose marker says it holds this
    very set; anything else, however valid as data, is refused without touching a file.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{key} {out_dir!r} is a file, not a folder; choose another {key} for the synthetic data set")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if MARKER_NAME not in entries:
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(
                f"{key} {out_dir!r} is not empty ({shown}) and holds no synthetic data set made by "
                f"osp_megatron (no {MARKER_NAME} marker), so synthetic data will not be written there. Choose "
                f"another (empty or absent) {key} for the synthetic set, or set data.synthetic=false to "
                "train on the shards already in that folder"
            )
        os.makedirs(out_dir, exist_ok=True)
        # The marker goes first: from here on the folder is known to hold this generator's files only.
        atomic_write_bytes(os.path.join(out_dir, MARKER_NAME), json.dumps(expected, indent=1).encode())
        return None
    found = _read_marker(out_dir, key)
    if found != expected:
        raise ConfigError(
            f"{key} {out_dir!r} holds a different synthetic data set {found}, expected {expected}; choose "
            f"another {key}, or delete that folder (it holds generated data only) to regenerate it"
        )
    index = read_index(out_dir)
    if index is not None:
        shards = [ShardInfo(os.path.join(out_dir, e["name"]), e["num_samples"]) for e in index["shards"]]
        if all(os.path.isfile(s.path) for s in shards):
            return shards
    # A set this generator began and did not finish (killed mid-write): its leftovers are rewritten.
    for name in entries:
        if _is_own_temporary(name):
            os.remove(os.path.join(out_dir, name))
    return None


def _pixel_latents(words, latent_shape, vae):
    """Latents [C, T, H, W] of each caption's rendered video, encoded by `vae` (the tiny block VAE, normalised)."""
    channels, frames, height, width = latent_shape
    if channels != vae.latent_channels:
        raise ConfigError(
            f"data.latent_channels={channels}: the tiny block VAE has {vae.latent_channels} latent channels"
        )
    size = (1 + vae.temporal_stride * (frames - 1), height * vae.spatial_stride, width * vae.spatial_stride)
    latents = {}
    for start in range(0, len(words), _ENCODE_BATCH):
        chunk = words[start : start + _ENCODE_BATCH]
        videos = np.stack([render_caption_video(*w, *size) for w in chunk])
        pixels = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        for w, latent in zip(chunk, vae.encode(pixels).numpy()):
            latents[w] = latent
    return latents


def write_synthetic_shards(
    out_dir: str,
    num_samples: int,
    samples_per_shard: int,
    latent_shape: tuple[int, int, int, int],
    text_len: int,
    text_dim: int,
    seed: int,
    text_encoder: CaptionTextEncoder,
    encoder_name: str,
    vae: str = "tiny-random",
    video_vae: CaptionVideoEncoder | None = None,
    held_out: bool = False,
) -> list[ShardInfo]:
    """Write shard-000000.tar ... and index.json into out_dir; return the list of ShardInfo.

    vae: "tiny-random" writes analytic latent blobs (no VAE involved: fast, for tests); "tiny-block" renders
    each caption as a pixel video and stores its latents from `video_vae` (the tiny block VAE), so samples decode
    to the caption's picture. text_encoder: a TextEncoder with max_length >= text_len, recorded in the index as
    `encoder_name`. (osp_megatron.engine.data.make_synthetic_shards builds both encoders.)
    Writes only into an absent or empty folder, or completes one it began itself (see _claim_folder); a
    complete set with the same parameters is reused untouched.
    held_out: draw captions and noise from a second stream of `seed`, so the set shares the text encoder of
    the training set made with the same seed but none of its samples (a held-out set for train.eval_interval).
    """
    latent_shape = tuple(int(s) for s in latent_shape)
    if len(latent_shape) != 4 or min(latent_shape) < 1:
        raise ConfigError(f"synthetic latent_shape must be four positive sizes (C, T, H, W), got {latent_shape}")
    if num_samples < 1 or samples_per_shard < 1:
        raise ConfigError(
            f"synthetic num_samples and samples_per_shard must be positive, got {num_samples} and {samples_per_shard}"
        )
    if vae not in SYNTHETIC_VAES:
        raise ConfigError(f"data.synthetic_vae: unknown VAE {vae!r}; choose one of {', '.join(SYNTHETIC_VAES)}")
    if vae == "tiny-block" and video_vae is None:
        raise ConfigError(
            "synthetic data with data.synthetic_vae=tiny-block needs the tiny block VAE to encode its videos"
        )
    expected = _expected_index(num_samples, samples_per_shard, latent_shape, text_len, text_dim, seed, vae, held_out)
    existing = _claim_folder(out_dir, expected, "data.eval_path" if held_out else "data.path")
    if existing is not None:
        return existing
    if text_encoder.text_dim != text_dim:
        raise ConfigError(
            f"synthetic data: the text encoder gives {text_encoder.text_dim}-d states, expected text_dim={text_dim}"
        )
    captions = all_captions()
    states, lengths = text_encoder.encode(captions)
    text_by_caption = {c: states[i, : min(int(lengths[i]), text_len)].numpy() for i, c in enumerate(captions)}

    rng = np.random.default_rng([seed, 1] if held_out else seed)
    words = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    drawn = [words[i] for i in rng.integers(len(words), size=num_samples)]
    distinct = sorted(set(drawn), key=words.index)
    if vae == "tiny-block":
        clean = _pixel_latents(distinct, latent_shape, video_vae)
    else:
        clean = {w: blob_latent(*w, latent_shape) for w in distinct}
    shards = []
    for shard_index, start in enumerate(range(0, num_samples, samples_per_shard)):
        count = min(samples_per_shard, num_samples - start)
        buffer = io.BytesIO()
        with webdataset.TarWriter(buffer) as writer:
            for i in range(start, start + count):
                colour, shape, motion = drawn[i]
                caption = caption_of(colour, shape, motion)
                latent = clean[drawn[i]] + NOISE_STD * rng.standard_normal(latent_shape).astype(np.float32)
                text = text_by_caption[caption]
                metadata = {
                    "caption": caption,
                    "colour": colour,
                    "shape": shape,
                    "motion": motion,
                    "latent_shape": list(latent_shape),
                    "text_length": int(text.shape[0]),
                }
                writer.write(
                    {
                        "__key__": f"sample{i:08d}",
                        "latent.npy": _npy_bytes(latent),
                        "text.npy": _npy_bytes(text),
                        "txt": caption.encode("utf-8"),
                        "json": json.dumps(metadata).encode("utf-8"),
                    }
                )
        path = os.path.join(out_dir, f"shard-{shard_index:06d}.tar")
        atomic_write_bytes(path, buffer.getvalue())
        shards.append(ShardInfo(path, count))
    # The index is written last: its presence marks the data set complete.
    write_index(out_dir, shards, **expected, text_encoder=encoder_name)
    return shards
