"""`osp-data inspect`: what a shard folder holds (samples per bucket, shapes, dtypes) and what was bad.

Reads the index and one sample per bucket; `--check` decodes every sample and counts the bad ones.
"""

import io
import json
import os
from collections.abc import Callable

import numpy as np

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.mixing import latent_bucket_name
from osp_megatron.data.shards import SampleError, iter_raw_samples, read_index, resolve_shards
from osp_megatron.data.video import VideoError, decode_clip

REPORT_FILES = ("build_report.json", "encode_report.json")


def _describe_entry(name, payload):
    try:
        return _describe_payload(name, payload)
    except (ValueError, OSError, EOFError, VideoError) as exc:
        return f"{name} (unreadable: {exc})"


def _describe_payload(name, payload):
    if name.endswith(".npy"):
        header = np.load(io.BytesIO(payload), allow_pickle=False)
        return f"{name} {list(header.shape)} {header.dtype}"
    if name == "mp4":
        frames = decode_clip(payload)
        return f"mp4 {len(frames)} frames {frames.shape[1]}x{frames.shape[2]} ({len(payload) / 2**20:.2f} MB)"
    return f"{name} ({len(payload)} bytes)"


def _check_sample(raw, kind):
    """Raise SampleError/VideoError/ValueError when one sample cannot be used."""
    if kind == "clips":
        if "mp4" not in raw:
            raise SampleError("no 'mp4' entry")
        decode_clip(raw["mp4"])
        return
    for name in ("latent.npy", "text.npy"):
        if name not in raw:
            raise SampleError(f"no '{name}' entry")
        array = np.load(io.BytesIO(raw[name]), allow_pickle=False)
        if not np.isfinite(array.astype(np.float32)).all():
            raise SampleError(f"'{name}' holds NaN or infinite values")


def inspect_folder(folder: str, check: bool = False, out: Callable[[str], None] = print) -> dict:
    """Print the summary of `folder`; returns it as a dict (buckets, shards, samples, bad samples)."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a folder")
    index = read_index(folder) or {}
    kind = "clips" if index.get("format") == "osp-clips-v1" else "latents"
    shards = resolve_shards(folder)
    buckets = {}
    for shard in shards:
        name = shard.bucket or (latent_bucket_name(shard.latent_shape) if shard.latent_shape else "?")
        row = buckets.setdefault(name, {"samples": 0, "shards": 0, "latent_shape": shard.latent_shape})
        row["samples"] += shard.num_samples
        row["shards"] += 1
    out(
        f"{folder}: {kind} shards, index format {index.get('format', 'none')}, {len(shards)} shards, "
        f"{sum(s.num_samples for s in shards)} samples"
    )
    out(f"{'bucket':>12} {'samples':>9} {'shards':>7}  latent shape / first sample")
    first = {}
    for shard in shards:
        name = shard.bucket or (latent_bucket_name(shard.latent_shape) if shard.latent_shape else "?")
        if name not in first:
            raw = next(iter_raw_samples(shard.path), None)
            first[name] = (
                ", ".join(_describe_entry(k, v) for k, v in sorted(raw.items()) if not k.startswith("__"))
                if raw
                else "(empty shard)"
            )
    for name, row in sorted(buckets.items()):
        out(f"{name:>12} {row['samples']:>9} {row['shards']:>7}  {first[name]}")
    summary = {
        "kind": kind,
        "shards": len(shards),
        "samples": sum(s.num_samples for s in shards),
        "buckets": {n: {"samples": r["samples"], "shards": r["shards"]} for n, r in buckets.items()},
    }
    for report_name in REPORT_FILES:
        path = os.path.join(folder, report_name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                counts = json.load(handle)["problems"]["counts"]
            summary[report_name] = counts
            out(f"{report_name}: bad inputs skipped when it was made: {counts or 'none'}")
    if check:
        bad = []
        for shard in shards:
            seen = 0
            try:
                for raw in iter_raw_samples(shard.path):
                    seen += 1
                    try:
                        _check_sample(raw, kind)
                    except (SampleError, VideoError, ValueError) as exc:
                        bad.append(f"{shard.path}/{raw['__key__']}: {exc}")
            except ConfigError as exc:
                bad.append(str(exc))
            if seen != shard.num_samples:
                bad.append(f"{shard.path}: holds {seen} samples, its index lists {shard.num_samples}")
        for line in bad:
            out(f"bad: {line}")
        out(f"checked every sample: {len(bad)} bad")
        summary["bad"] = bad
    return summary
