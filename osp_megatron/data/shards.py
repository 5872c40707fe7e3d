"""Webdataset shards of pre-encoded samples: finding them, indexing them, reading and checking samples.

A sample is `latent.npy` [C, T, H, W], `text.npy` [l, text_dim] (unpadded states), `txt` and `json`.
"""

import glob
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import webdataset

from osp_megatron.config.errors import ConfigError

INDEX_NAME = "index.json"


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int


def atomic_write_bytes(path, data):
    """Write to a temporary sibling, then rename, so readers never see a half-written file."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_index(folder, shards, **metadata):
    """Write folder/index.json listing each shard's file name and sample count, plus free-form metadata."""
    entries = [{"name": os.path.basename(s.path), "num_samples": s.num_samples} for s in shards]
    index = dict(metadata, shards=entries)
    atomic_write_bytes(os.path.join(folder, INDEX_NAME), json.dumps(index, indent=1).encode())


def read_index(folder):
    """Return the parsed folder/index.json, or None when there is none."""
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        counts = {e["name"]: int(e["num_samples"]) for e in index["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not a valid shard index ({exc}); expected JSON with 'shards': [{{'name', 'num_samples'}}]"
        ) from exc
    index["counts"] = counts
    return index


def iter_raw_samples(shard_path):
    """Yield the samples of one tar shard in file order as dicts of raw bytes (plus '__key__').

    Any tar-level failure (corrupt or truncated file) is raised as ConfigError naming the shard.
    """
    try:
        with open(shard_path, "rb") as stream:
            files = webdataset.tariterators.tar_file_expander([{"url": shard_path, "stream": stream}])
            yield from webdataset.tariterators.group_by_keys(files)
    except ConfigError:
        raise
    except Exception as exc:
        # webdataset appends the stream and url to the exception's args; the first one is the reason.
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        raise ConfigError(f"shard {shard_path}: cannot read the tar file ({reason}); the shard is corrupt or "
                          "truncated") from exc


def count_samples(shard_path):
    return sum(1 for _ in iter_raw_samples(shard_path))


def resolve_shards(path):
    """Shard list of a folder (its index.json, or every *.tar in it) or of a list of globs, with counts.

    Counts come from the index.json beside each shard when it lists the shard, otherwise from a scan.
    """
    if isinstance(path, str) and os.path.isdir(path):
        index = read_index(path)
        if index is not None:
            names = [e["name"] for e in index["shards"]]
            paths = [os.path.join(path, name) for name in names]
        else:
            paths = sorted(glob.glob(os.path.join(path, "*.tar")))
        where = f"data.path folder {path!r}"
    else:
        patterns = [path] if isinstance(path, str) else list(path)
        paths = []
        for pattern in patterns:
            matches = sorted(glob.glob(pattern))
            if not matches and not glob.has_magic(pattern):
                raise ConfigError(f"data.path {pattern!r} is neither a folder of shards nor a shard file")
            if not matches:
                raise ConfigError(f"data.path: the shard glob {pattern!r} matches no file")
            paths.extend(m for m in matches if m not in paths)
        where = f"data.path globs {patterns!r}"
    if not paths:
        raise ConfigError(f"{where} holds no .tar shards")

    indexes = {}
    shards = []
    for shard_path in paths:
        if not os.path.isfile(shard_path):
            raise ConfigError(f"shard {shard_path} is listed in {INDEX_NAME} but does not exist")
        folder = os.path.dirname(shard_path)
        if folder not in indexes:
            indexes[folder] = read_index(folder)
        index = indexes[folder]
        name = os.path.basename(shard_path)
        if index is not None and name in index["counts"]:
            count = index["counts"][name]
        else:
            count = count_samples(shard_path)
        shards.append(ShardInfo(shard_path, count))
    return shards


def _load_npy(raw, name, shard_path):
    if name not in raw:
        raise ConfigError(f"shard {shard_path}, sample {raw['__key__']!r}: missing the '{name}' entry")
    try:
        return np.load(io.BytesIO(raw[name]), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConfigError(
            f"shard {shard_path}, sample {raw['__key__']!r}: '{name}' is not a valid .npy ({exc})"
        ) from exc


def decode_sample(raw, shard_path, latent_shape, text_len, text_dim):
    """Raw sample -> (latent [C,T,H,W] float32, text states [text_len, text_dim] zero-padded, length, caption).

    Shapes are checked against the configured ones, with the shard and sample key in the message.
    """
    key = raw["__key__"]
    latent = _load_npy(raw, "latent.npy", shard_path)
    if tuple(latent.shape) != tuple(latent_shape):
        raise ConfigError(
            f"shard {shard_path}, sample {key!r}: latent.npy has shape {tuple(latent.shape)}, expected "
            f"{tuple(latent_shape)} from data.latent_channels/latent_frames/latent_height/latent_width"
        )
    text = _load_npy(raw, "text.npy", shard_path)
    if text.ndim != 2 or text.shape[1] != text_dim or not 1 <= text.shape[0] <= text_len:
        raise ConfigError(
            f"shard {shard_path}, sample {key!r}: text.npy has shape {tuple(text.shape)}, expected "
            f"[length <= data.text_len={text_len}, data.text_dim={text_dim}]"
        )
    states = torch.zeros(text_len, text_dim)
    states[: text.shape[0]] = torch.from_numpy(text.astype(np.float32, copy=False))
    caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
    return torch.from_numpy(latent.astype(np.float32, copy=False)), states, text.shape[0], caption
