"""Tensor-parallel sharded safetensors: one file per tensor-parallel rank, readable at any other TP size.

Each file's header records, per tensor, the dimension it is split along (or none when replicated), so a
loader can concatenate source shards and re-split them for a different tensor-parallel size one tensor at a
time, never holding more than that tensor beyond its own shard.
"""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from osp_megatron.checkpointing.integrity import CheckpointCorruptError, verify_file
from osp_megatron.config.errors import ConfigError

PARTITION_KEY = "osp_megatron.partition_dims"


@contextlib.contextmanager
def open_shard(path: Path, check_content: bool = True):
    """safe_open a shard after checking it against its checkpoint's manifest; a damaged file is an error
    naming it, never a library traceback."""
    verify_file(path, check_content)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointCorruptError(
            f"{path}: not a readable safetensors file ({reason}); the file is truncated, "
            "damaged or not a checkpoint shard"
        ) from exc
    with handle:
        yield handle


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension megatron-core split this parameter along, or None if every TP rank holds it whole."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def shard_file(directory: Path, tp_rank: int, tp_size: int) -> Path:
    return Path(directory) / f"tp{tp_rank:02d}-of-{tp_size:02d}.safetensors"


def save_shard(
    directory: Path, tensors: dict[str, torch.Tensor], partition: dict[str, int | None], tp_rank: int, tp_size: int
) -> Path:
    """Write this rank's tensors (fsynced) with their partition dims in the file header."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = shard_file(directory, tp_rank, tp_size)
    plain = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {PARTITION_KEY: json.dumps({name: partition.get(name) for name in plain}), "tp_size": str(tp_size)}
    tmp = path.with_suffix(".tmp")
    save_file(plain, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def source_layout(directory: Path, check_content: bool = True) -> tuple[int, list[Path], dict[str, int | None]]:
    """(tp_size, shard paths in rank order, partition dims) of a sharded folder (reads one header)."""
    directory = Path(directory)
    files = sorted(directory.glob("tp*-of-*.safetensors"))
    if not files:
        raise ConfigError(f"no tensor shards (tpNN-of-MM.safetensors) found in {str(directory)!r}")
    tp_size = int(files[0].stem.split("-of-")[1])
    expected = [shard_file(directory, r, tp_size) for r in range(tp_size)]
    missing = [str(p) for p in expected if not p.exists()]
    if missing:
        raise ConfigError(f"checkpoint folder {str(directory)!r} lacks shards {missing}")
    with open_shard(expected[0], check_content) as handle:
        partition = json.loads(handle.metadata()[PARTITION_KEY])
    return tp_size, expected, partition


def read_full_tensor(paths: list[Path], name: str, dim: int | None) -> torch.Tensor:
    """One tensor reassembled from all source shards (concatenated along its split dim)."""
    if dim is None:
        with open_shard(paths[0]) as handle:
            return handle.get_tensor(name)
    pieces = []
    for path in paths:
        with open_shard(path) as handle:
            pieces.append(handle.get_tensor(name))
    return torch.cat(pieces, dim=dim)


def read_local_tensor(paths: list[Path], name: str, dim: int | None, tp_rank: int, tp_size: int):
    """This rank's piece of a tensor for a target tensor-parallel size, whatever the source size was."""
    if dim is None:
        return read_full_tensor(paths, name, None)
    if len(paths) == tp_size:
        with open_shard(paths[tp_rank]) as handle:
            return handle.get_tensor(name)
    full = read_full_tensor(paths, name, dim)
    if full.shape[dim] % tp_size:
        raise ConfigError(
            f"tensor {name!r} of size {full.shape[dim]} along dim {dim} cannot be split into "
            f"{tp_size} tensor-parallel shards"
        )
    return full.chunk(tp_size, dim=dim)[tp_rank].clone()


def iter_full_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a sharded folder at full size, one at a time (for export and inspection)."""
    _, paths, partition = source_layout(directory)
    for name in sorted(partition):
        yield name, read_full_tensor(paths, name, partition[name])


def load_shard_into(
    directory: Path,
    targets: dict[str, torch.Tensor],
    tp_rank: int,
    tp_size: int,
    strict: bool = True,
    what: str = "model",
) -> tuple[list[str], list[str]]:
    """Copy stored tensors into `targets` (this rank's local tensors), resharding as needed.

    Returns (missing, unexpected) names; with strict=True either is an error naming them.
    """
    _, paths, partition = source_layout(directory)
    missing = sorted(set(targets) - set(partition))
    unexpected = sorted(set(partition) - set(targets))
    if strict and (missing or unexpected):
        raise ConfigError(
            f"{what} checkpoint {str(directory)!r} does not match: missing {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
        )
    for name, target in targets.items():
        if name not in partition:
            continue
        local = read_local_tensor(paths, name, partition[name], tp_rank, tp_size)
        if local.shape != target.shape:
            raise ConfigError(
                f"{what} tensor {name!r}: stored shard has shape {tuple(local.shape)} but this "
                f"model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(local.to(target.dtype))
    return missing, unexpected
