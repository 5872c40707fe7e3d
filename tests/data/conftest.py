"""Shared fixtures for the data tests: a synthetic shard set, real MP4 videos with bad ones, their clip and
latent shards (built and encoded once per session), and a writer of bucketed latent shards.

Tests that modify shards copy them first, so the shared sets stay intact.
"""

import json
import os

import numpy as np
import pytest
import webdataset

from osp_megatron.data.config import DataConfig
from osp_megatron.engine.data import make_synthetic_shards
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.inference.video_io import write_video

LATENT_SHAPE = (16, 2, 4, 6)
TEXT_LEN = 32
TEXT_DIM = 16


@pytest.fixture
def make_config():
    """Factory of DataConfigs matching the shared shard set, with field overrides."""

    def build(path, **overrides):
        c, t, h, w = LATENT_SHAPE
        fields = dict(
            path=path if isinstance(path, list) else str(path),
            latent_channels=c,
            latent_frames=t,
            latent_height=h,
            latent_width=w,
            text_len=TEXT_LEN,
            text_dim=TEXT_DIM,
            num_workers=0,
            shuffle=True,
            synthetic_seed=3,
        )
        fields.update(overrides)
        return DataConfig(**fields)

    return build


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """50 samples in shards of 8 (the last one holds 2), so epochs and ranks cut through shards."""
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic_shards(str(folder), 50, 8, LATENT_SHAPE, TEXT_LEN, TEXT_DIM, seed=3)
    return folder


# -- real videos, bucketed shards ------------------------------------------------------------------------------
VIDEO_FPS = 12
CLIP_FPS = 8
CLIP_FRAMES = 5
BUCKETS = "64x64,64x96,96x64"
TEXT_DIM_REAL = 32  # the default tiny model's text_dim, so osp-train runs on the encoded shards as is


def moving_square_video(num_frames, height, width, seed):
    """uint8 [F, H, W, 3]: a coloured square sliding right over a flat background whose level counts frames."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(120, 255, 3)
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = 4 * t % 100  # background level = frame number, so tests can tell which frame was kept
        x = (width - 16) * t // max(num_frames - 1, 1)
        frames[t, height // 2 - 8 : height // 2 + 8, x : x + 16] = colour
    return frames


@pytest.fixture(scope="session")
def raw_videos(tmp_path_factory):
    """A folder of MP4s (landscape, portrait, square) with a captions.jsonl, plus every kind of bad input."""
    folder = tmp_path_factory.mktemp("raw")
    rows = []
    sizes = [(64, 96), (96, 64), (64, 64), (72, 128), (96, 64)]
    for i, (height, width) in enumerate(sizes):
        write_video(str(folder / f"clip{i}.mp4"), moving_square_video(24, height, width, i), fps=VIDEO_FPS)
        rows.append({"path": f"clip{i}.mp4", "caption": f"a square number {i} sliding right"})
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    rows.append({"path": "corrupt.mp4", "caption": "noise"})
    (folder / "empty.mp4").write_bytes(b"")
    rows.append({"path": "empty.mp4", "caption": "nothing"})
    write_video(str(folder / "short.mp4"), moving_square_video(3, 64, 64, 9), fps=VIDEO_FPS)
    rows.append({"path": "short.mp4", "caption": "too short for a clip"})
    write_video(str(folder / "uncaptioned.mp4"), moving_square_video(24, 64, 64, 10), fps=VIDEO_FPS)
    rows.append({"path": "absent.mp4", "caption": "a video that is not there"})
    with open(folder / "captions.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def build_clips(raw, output, **options):
    from osp_data.build import build_dataset

    settings = dict(
        fps=CLIP_FPS,
        frames=CLIP_FRAMES,
        buckets=BUCKETS,
        shard_size_mb=0.002,
        workers=0,
        max_clips_per_video=2,
        progress=False,
    )
    settings.update(options)
    return build_dataset(str(raw), str(raw / "captions.jsonl"), str(output), **settings)


@pytest.fixture(scope="session")
def clip_builder():
    """build_clips(raw folder, output, **overrides): `osp-data build` with the tests' clip settings."""
    return build_clips


@pytest.fixture(scope="session")
def clip_dir(raw_videos, tmp_path_factory):
    """`osp-data build` output of raw_videos: 2 clips per good video, small shards so buckets span several."""
    folder = tmp_path_factory.mktemp("clips") / "out"
    build_clips(raw_videos, folder)
    return folder


def encode_on_rank(rank, world_size, clip_folder, output):
    """`osp-data encode` with the tests' settings; under run_on_ranks each rank takes its share of the shards."""
    from osp_data.encode import encode_dataset

    return encode_dataset(
        clip_folder, output, text_dim=TEXT_DIM_REAL, text_len=32, batch_size=2, latent_dtype="float16", progress=False
    )


@pytest.fixture(scope="session")
def latent_dir(clip_dir, tmp_path_factory):
    """`osp-data encode` of clip_dir in this process (one rank); test_osp_data checks that two ranks agree."""
    folder = tmp_path_factory.mktemp("latents") / "out"
    encode_on_rank(0, 1, str(clip_dir), str(folder))
    return folder


@pytest.fixture(scope="session")
def encode_on_ranks():
    """encode_on_ranks(clip folder, output, ranks): `osp-data encode` on that many gloo rank processes."""

    def encode(clip_folder, output, ranks):
        return run_on_ranks(encode_on_rank, ranks, str(clip_folder), str(output))

    return encode


@pytest.fixture(scope="session")
def latent_shard_writer():
    """write_latent_shards(folder, {latent shape: count}, ...): bucketed latent shards with a full index."""
    return write_latent_shards


def write_latent_shards(folder, counts, samples_per_shard=4, text_len=TEXT_LEN, text_dim=TEXT_DIM, prefix="s"):
    """Latent shards with an index (bucket, shape, offsets), `counts` samples per latent shape; keys name both.

    Each latent is filled with its sample number, so tests can check which sample a batch holds.
    """
    from osp_megatron.data.shards import ShardInfo, npy_bytes, sample_offsets, write_index

    os.makedirs(folder, exist_ok=True)
    shards, number = [], 0
    for shape, count in counts.items():
        name = "x".join(str(s) for s in shape[1:])
        for first in range(0, count, samples_per_shard):
            path = os.path.join(folder, f"{prefix}-{name}-{first:04d}.tar")
            with webdataset.TarWriter(path) as writer:
                for _ in range(first, min(count, first + samples_per_shard)):
                    text = np.ones((3, text_dim), np.float32)
                    writer.write(
                        {
                            "__key__": f"{prefix}{number:05d}",
                            "latent.npy": npy_bytes(np.full(shape, number, np.float32), "float16"),
                            "text.npy": npy_bytes(text, "float16"),
                            "txt": f"{prefix} sample {number}".encode(),
                        }
                    )
                    number += 1
            offsets = sample_offsets(path)
            shards.append(ShardInfo(path, len(offsets) - 1, name, tuple(shape), offsets))
    write_index(str(folder), shards, format="osp-latents-v1", text_dim=text_dim, text_len=text_len)
    return folder
