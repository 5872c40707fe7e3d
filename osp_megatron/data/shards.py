"""Webdataset shards of pre-encoded samples: finding and indexing them, random access to one sample, decoding.

A sample is `latent.npy` [C, T, H, W], `text.npy` [l, text_dim] (unpadded states), `txt` and `json`.
"""

import glob
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import torch
import webdataset

from osp_megatron.config.errors import ConfigError

INDEX_NAME = "index.json"


class SampleError(Exception):
    """One sample that cannot be used (missing entry, not a .npy, wrong shape); the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file. bucket and latent_shape describe every sample in it (None: not known from an index);
    offsets (num_samples + 1 byte positions) give each sample's span of tar members, for random access."""

    path: str
    num_samples: int
    bucket: str | None = None
    latent_shape: tuple | None = None
    offsets: tuple | None = None
    # Width and most tokens of the text states, from the index (`osp-data encode --text-dim / --text-len`).
    text_dim: int | None = None
    text_len: int | None = None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename, so readers never see a half-written file."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def npy_bytes(array: np.ndarray, dtype: npt.DTypeLike = np.float32) -> bytes:
    """A plain .npy (no pickle) of `array` stored as `dtype`."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


def shard_entry(shard: ShardInfo) -> dict:
    """The index.json record of a ShardInfo."""
    entry = {"name": os.path.basename(shard.path), "num_samples": shard.num_samples}
    if shard.bucket is not None:
        entry["bucket"] = shard.bucket
    if shard.latent_shape is not None:
        entry["latent_shape"] = list(shard.latent_shape)
    if shard.offsets is not None:
        entry["offsets"] = list(shard.offsets)
    return entry


def write_index(folder: str, shards: list[ShardInfo], **metadata: object) -> None:
    """Write folder/index.json listing each shard's file name and sample count, plus free-form metadata."""
    index = dict(metadata, shards=[shard_entry(s) for s in shards])
    atomic_write_bytes(os.path.join(folder, INDEX_NAME), json.dumps(index, indent=1).encode())


def read_index(folder: str) -> dict | None:
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


def iter_raw_samples(shard_path: str) -> Iterator[dict]:
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
        raise ConfigError(
            f"shard {shard_path}: cannot read the tar file ({reason}); the shard is corrupt or truncated"
        ) from exc


def count_samples(shard_path: str) -> int:
    return sum(1 for _ in iter_raw_samples(shard_path))


def sample_offsets(shard_path: str) -> tuple[int, ...]:
    """Byte offsets where each sample's tar members start, plus the end of the last one (tar headers only)."""
    offsets, last_key, end = [], None, 0
    try:
        with tarfile.open(shard_path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _ = webdataset.tariterators.base_plus_ext(member.name)
                if key != last_key:
                    offsets.append(member.offset)
                    last_key = key
                blocks = (member.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE
                end = member.offset_data + blocks * tarfile.BLOCKSIZE
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(
            f"shard {shard_path}: cannot read the tar file ({exc}); the shard is corrupt or truncated"
        ) from exc
    return tuple(offsets + [end]) if offsets else ()


def read_sample_at(handle: BinaryIO, start: int, end: int, shard_path: str) -> dict:
    """The raw sample (dict of bytes plus '__key__') whose members span bytes [start, end) of an open shard."""
    handle.seek(start)
    data = handle.read(end - start)
    if len(data) != end - start:
        raise SampleError(
            f"shard {shard_path}: ends at byte {start + len(data)}, before the sample at bytes "
            f"[{start}, {end}); the shard is truncated or the index is stale"
        )
    raw = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                key, suffix = webdataset.tariterators.base_plus_ext(member.name)
                raw.setdefault("__key__", key)
                raw[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise SampleError(f"shard {shard_path}: bytes [{start}, {end}) are not a tar sample ({exc})") from exc
    if "__key__" not in raw:
        raise SampleError(f"shard {shard_path}: bytes [{start}, {end}) hold no tar member")
    return raw


def _first_latent_shape(shard_path):
    for raw in iter_raw_samples(shard_path):
        if "latent.npy" in raw:
            return tuple(_load_npy(raw, "latent.npy", shard_path).shape)
    return None


def resolve_shards(path: str | list[str]) -> list[ShardInfo]:
    """Shard list of a folder (its index.json, or every *.tar in it) or of a list of globs, with counts.

    Counts, buckets, latent shapes and sample offsets come from the index.json beside each shard when it
    lists the shard; otherwise the shard is scanned (count and the shape of its first sample).
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
        entry = next((e for e in index["shards"] if e["name"] == name), None) if index is not None else None
        if entry is None:
            shards.append(
                ShardInfo(shard_path, count_samples(shard_path), latent_shape=_first_latent_shape(shard_path))
            )
            continue
        shape = entry.get("latent_shape", index.get("latent_shape"))
        offsets = entry.get("offsets")
        shards.append(
            ShardInfo(
                shard_path,
                int(entry["num_samples"]),
                entry.get("bucket"),
                tuple(shape) if shape is not None else None,
                tuple(offsets) if offsets is not None else None,
                index.get("text_dim"),
                index.get("text_len"),
            )
        )
    return shards


def check_text_states(shards: list[ShardInfo], text_len: int, text_dim: int, where: str) -> None:
    """ConfigError, before any sample is read, when the indexes say the shards' text states do not fit
    data.text_dim / data.text_len (shards encoded for another text encoder, e.g. umT5-XXL's 4096 for a tiny DiT).
    """
    for shard in shards:
        if shard.text_dim is not None and shard.text_dim != text_dim:
            raise ConfigError(
                f"{where}: its shards hold text states of width {shard.text_dim} ({INDEX_NAME} text_dim, from "
                f"`osp-data encode`), but data.text_dim is {text_dim} (it follows model.text_dim); encode them "
                f"again with `osp-data encode --config` of this training config (or --text-dim {text_dim}), or "
                f"train a model with model.text_dim={shard.text_dim}"
            )
        if shard.text_len is not None and shard.text_len > text_len:
            raise ConfigError(
                f"{where}: its shards hold up to {shard.text_len} text tokens a sample ({INDEX_NAME} text_len, from "
                f"`osp-data encode`), but data.text_len is {text_len} (it follows model.text_len); encode them "
                f"again with `osp-data encode --config` of this training config (or --text-len {text_len}), or "
                f"train a model with model.text_len={shard.text_len}"
            )


def _load_npy(raw, name, shard_path):
    if name not in raw:
        raise SampleError(f"shard {shard_path}, sample {raw['__key__']!r}: missing the '{name}' entry")
    try:
        return np.load(io.BytesIO(raw[name]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SampleError(
            f"shard {shard_path}, sample {raw['__key__']!r}: '{name}' is not a valid .npy ({exc})"
        ) from exc


def decode_sample(
    raw: dict, shard_path: str, latent_shape: tuple[int, ...], text_len: int, text_dim: int
) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """Raw sample -> (latent [C,T,H,W] float32, text states [text_len, text_dim] zero-padded, length, caption).

    Raises SampleError, naming the shard and sample key, for a missing or mis-shaped entry.
    """
    key = raw["__key__"]
    latent = _load_npy(raw, "latent.npy", shard_path)
    if tuple(latent.shape) != tuple(latent_shape):
        raise SampleError(
            f"shard {shard_path}, sample {key!r}: latent.npy has shape {tuple(latent.shape)}, expected "
            f"{tuple(latent_shape)} (the shape of its shard's bucket)"
        )
    text = _load_npy(raw, "text.npy", shard_path)
    if text.ndim != 2 or text.shape[1] != text_dim or not 1 <= text.shape[0] <= text_len:
        raise SampleError(
            f"shard {shard_path}, sample {key!r}: text.npy has shape {tuple(text.shape)}, expected "
            f"[length <= data.text_len={text_len}, data.text_dim={text_dim}]"
        )
    latent = torch.from_numpy(latent).float()
    # One reduction instead of an element-wise mask: any NaN or infinity makes the sum non-finite.
    if not math.isfinite(float(latent.sum())):
        raise SampleError(f"shard {shard_path}, sample {key!r}: latent.npy holds NaN or infinite values")
    states = torch.empty(text_len, text_dim)
    states[: text.shape[0]] = torch.from_numpy(text)  # converts to float32 while copying
    states[text.shape[0] :] = 0
    caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else ""
    return latent, states, text.shape[0], caption
