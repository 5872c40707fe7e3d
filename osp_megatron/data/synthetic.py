"""A learnable synthetic text-to-latent-video data set, written as real webdataset shards.

Captions name a colour, a shape and a motion; the latent is a moving blob that those three words determine.
"""

import argparse
import io
import itertools
import json
import os

import warnings

import numpy as np
import webdataset

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.shards import ShardInfo, atomic_write_bytes, read_index, write_index

INDEX_FORMAT = "osp-synthetic-v1"
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "wide bar", "tall bar")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "staying still")
# Per latent frame the blob travels this fraction of the frame; the start is chosen so it stays inside.
_TRAVEL = 0.4
_VELOCITY = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1),
             "staying still": (0, 0)}
NOISE_STD = 0.05
BLOB_AMPLITUDE = 2.0


def caption_of(colour, shape, motion):
    return f"a {colour} {shape} {motion}"


def all_captions():
    """Every caption the synthetic data set can contain, in a fixed order."""
    return [caption_of(*words) for words in itertools.product(COLOURS, SHAPES, MOTIONS)]


def colour_pattern(colour, channels):
    """A fixed unit-RMS channel vector per colour; independent of the seed so every data set agrees."""
    rng = np.random.default_rng(1000 + COLOURS.index(colour))
    pattern = rng.standard_normal(channels)
    return pattern / np.sqrt(np.mean(pattern**2))


def blob_latent(colour, shape, motion, latent_shape):
    """The noise-free latent [C, T, H, W] of a caption: a blob of the colour's channel pattern in motion."""
    channels, frames, height, width = latent_shape
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    sigma_x, sigma_y = {"circle": (0.15, 0.15), "square": (0.15, 0.15), "wide bar": (0.3, 0.08),
                        "tall bar": (0.08, 0.3)}[shape]
    dx, dy = _VELOCITY[motion]
    latent = np.zeros(latent_shape, dtype=np.float32)
    pattern = colour_pattern(colour, channels)[:, None, None]
    for t in range(frames):
        progress = t / (frames - 1) if frames > 1 else 0.5
        cx = 0.5 + dx * _TRAVEL * (progress - 0.5)
        cy = 0.5 + dy * _TRAVEL * (progress - 0.5)
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


def _expected_index(num_samples, samples_per_shard, latent_shape, text_len, text_dim, seed):
    return {"format": INDEX_FORMAT, "num_samples": num_samples, "samples_per_shard": samples_per_shard,
            "latent_shape": list(latent_shape), "text_len": text_len, "text_dim": text_dim, "seed": seed}


def make_synthetic_shards(out_dir, num_samples, samples_per_shard, latent_shape, text_len, text_dim, seed=0,
                          text_encoder=None):
    """Write shard-000000.tar ... and index.json into out_dir; return the list of ShardInfo.

    Reuses a complete data set written with the same parameters; a different one in out_dir is an error.
    text_encoder: a TextEncoder with max_length >= text_len; None builds the tiny one seeded with `seed`.
    """
    latent_shape = tuple(int(s) for s in latent_shape)
    if len(latent_shape) != 4 or min(latent_shape) < 1:
        raise ConfigError(f"synthetic latent_shape must be four positive sizes (C, T, H, W), got {latent_shape}")
    if num_samples < 1 or samples_per_shard < 1:
        raise ConfigError(f"synthetic num_samples and samples_per_shard must be positive, got "
                          f"{num_samples} and {samples_per_shard}")
    expected = _expected_index(num_samples, samples_per_shard, latent_shape, text_len, text_dim, seed)
    index = read_index(out_dir) if os.path.isdir(out_dir) else None
    if index is not None:
        found = {key: index.get(key) for key in expected}
        if found != expected:
            raise ConfigError(
                f"{os.path.join(out_dir, 'index.json')}: holds a different data set {found}, expected {expected}; "
                "choose another data.path or delete the folder"
            )
        shards = [ShardInfo(os.path.join(out_dir, e["name"]), e["num_samples"]) for e in index["shards"]]
        if all(os.path.isfile(s.path) for s in shards):
            return shards
    os.makedirs(out_dir, exist_ok=True)

    encoder_name = "given"
    if text_encoder is None:
        from osp_megatron.models.text_encoder import build_text_encoder

        text_encoder = build_text_encoder(None, text_dim, text_len, seed=seed)
        encoder_name = f"tiny-umt5-bytes(seed={seed})"
        longest = max(len(c.encode("utf-8")) + 1 for c in all_captions())
        if longest > text_len:
            # The byte tokenizer spends one token per character, and the motion word comes last.
            warnings.warn(f"synthetic data: text_len={text_len} truncates captions of up to {longest} byte "
                          "tokens, so some words will not reach the model")
    if text_encoder.text_dim != text_dim:
        raise ConfigError(f"synthetic data: the text encoder gives {text_encoder.text_dim}-d states, "
                          f"expected text_dim={text_dim}")
    captions = all_captions()
    states, lengths = text_encoder.encode(captions)
    text_by_caption = {c: states[i, : min(int(lengths[i]), text_len)].numpy() for i, c in enumerate(captions)}

    rng = np.random.default_rng(seed)
    words = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    shards = []
    for shard_index, start in enumerate(range(0, num_samples, samples_per_shard)):
        count = min(samples_per_shard, num_samples - start)
        buffer = io.BytesIO()
        with webdataset.TarWriter(buffer) as writer:
            for i in range(start, start + count):
                colour, shape, motion = words[rng.integers(len(words))]
                caption = caption_of(colour, shape, motion)
                latent = blob_latent(colour, shape, motion, latent_shape)
                latent += NOISE_STD * rng.standard_normal(latent_shape).astype(np.float32)
                text = text_by_caption[caption]
                metadata = {"caption": caption, "colour": colour, "shape": shape, "motion": motion,
                            "latent_shape": list(latent_shape), "text_length": int(text.shape[0])}
                writer.write({"__key__": f"sample{i:08d}", "latent.npy": _npy_bytes(latent),
                              "text.npy": _npy_bytes(text), "txt": caption.encode("utf-8"),
                              "json": json.dumps(metadata).encode("utf-8")})
        path = os.path.join(out_dir, f"shard-{shard_index:06d}.tar")
        atomic_write_bytes(path, buffer.getvalue())
        shards.append(ShardInfo(path, count))
    # The index is written last: its presence marks the data set complete.
    write_index(out_dir, shards, **expected, text_encoder=encoder_name)
    return shards


def ensure_synthetic_data(config):
    """Create config.path's synthetic data set from a DataConfig when config.synthetic is set (idempotent)."""
    if not config.synthetic:
        return None
    return make_synthetic_shards(config.path, config.synthetic_num_samples, config.synthetic_samples_per_shard,
                                 config.latent_shape, config.text_len, config.text_dim, config.synthetic_seed)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="osp-make-synthetic",
        description="Write a learnable synthetic data set of (latent video, text state) pairs as webdataset "
        "shards. Captions such as 'a red circle moving left' determine a moving blob in latent space, so a "
        "small DiT learns text conditioning in a few hundred CPU steps.",
    )
    parser.add_argument("--out", required=True, help="folder to write shard-*.tar and index.json into")
    parser.add_argument("--num-samples", type=int, default=1024, help="total number of samples (default 1024)")
    parser.add_argument("--samples-per-shard", type=int, default=128, help="samples per .tar shard (default 128)")
    parser.add_argument("--latent-channels", type=int, default=16, help="latent channels C (default 16, Wan VAE)")
    parser.add_argument("--latent-frames", type=int, default=3, help="latent frames T (default 3 = 9 video frames)")
    parser.add_argument("--latent-height", type=int, default=16, help="latent height H (default 16 = 128 pixels)")
    parser.add_argument("--latent-width", type=int, default=16, help="latent width W (default 16 = 128 pixels)")
    parser.add_argument("--text-len", type=int, default=32, help="maximum text tokens per caption (default 32)")
    parser.add_argument("--text-dim", type=int, default=64, help="text state width; must match the DiT (default 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds captions, noise and the tiny text encoder; sample with the same seed (default 0)")
    parser.add_argument("--text-encoder", default=None,
                        help="local umT5 folder to encode captions with (default: the tiny random encoder)")
    args = parser.parse_args(argv)
    text_encoder = None
    if args.text_encoder is not None:
        from osp_megatron.models.text_encoder import build_text_encoder

        text_encoder = build_text_encoder(args.text_encoder, args.text_dim, args.text_len)
    latent_shape = (args.latent_channels, args.latent_frames, args.latent_height, args.latent_width)
    shards = make_synthetic_shards(args.out, args.num_samples, args.samples_per_shard, latent_shape, args.text_len,
                                   args.text_dim, args.seed, text_encoder)
    print(f"{sum(s.num_samples for s in shards)} samples in {len(shards)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
