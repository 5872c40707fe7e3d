"""Checkpoints read and written in one plain process, tensor by tensor, whatever their format and layout.

Used by osp-ckpt (inspect, export, average, import) and tests; free of megatron-core, so tools start fast.
"""

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from osp_megatron.checkpointing.integrity import CheckpointCorruptError, read_manifest, verify_checkpoint
from osp_megatron.checkpointing.metadata import STATE, is_distributed_format, read_metadata
from osp_megatron.checkpointing.sharded import iter_full_tensors, open_shard, read_full_tensor, source_layout
from osp_megatron.config.errors import ConfigError

KINDS = ("model", "ema", "optimizer")
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


# -- torch.distributed.checkpoint folders -------------------------------------------------------------------
@contextlib.contextmanager
def _one_process():
    """DCP in this one process, without its warning that no process group is running (that is the intent)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def stored_index(folder: Path) -> dict[str, TensorStorageMetadata]:
    """key -> storage metadata (full size, dtype, stored pieces) of every tensor of a DCP folder."""
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{str(folder)!r} is not a readable torch.distributed.checkpoint folder ({exc})") from exc
    return {
        key: value for key, value in metadata.state_dict_metadata.items() if isinstance(value, TensorStorageMetadata)
    }


def read_tensor(folder: Path, key: str, index: dict | None = None) -> torch.Tensor:
    """One whole tensor of a DCP folder, assembled from its stored pieces (reads only those bytes)."""
    index = index if index is not None else stored_index(folder)
    if key not in index:
        raise ConfigError(f"{str(folder)!r} stores no tensor {key!r}")
    meta = index[key]
    target = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    try:
        with _one_process():
            dcp.load({key: target}, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    except Exception as exc:  # DCP's own error for an unreadable piece
        raise CheckpointCorruptError(f"{folder}: tensor {key!r} cannot be read ({exc})") from exc
    return target


class _ProducingSavePlanner(DefaultSavePlanner):
    """Plans with shape-only (meta) tensors and computes each one when the writer asks for its bytes."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self.produce = produce

    def lookup_object(self, index):
        return self.produce(index.fqn).contiguous()


def write_tensors_streaming(
    folder: Path, specs: dict[str, tuple[tuple, torch.dtype]], produce: Callable[[str], torch.Tensor]
) -> None:
    """Write a one-process DCP folder of whole tensors `specs` (key -> (shape, dtype)), calling produce(key)
    for one tensor at a time as it is written: memory holds one tensor, never the whole checkpoint."""
    planned = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in specs.items()}
    with _one_process():
        dcp.save(
            planned, storage_writer=FileSystemWriter(str(folder)), planner=_ProducingSavePlanner(produce), no_dist=True
        )


def check_state_files(path: Path) -> None:
    """Every state file's size and the state index's CRC-32 against the manifest (when there is one), so
    a truncated or missing file is named before anything is read from it."""
    manifest = read_manifest(path)
    if manifest is None:
        return
    names = [name for name in manifest["files"] if name.startswith(STATE + "/")]
    verify_checkpoint(path, names, check_content=False)
    verify_checkpoint(path, [name for name in names if name.endswith("/.metadata")])


# -- checkpoints of either format -----------------------------------------------------------------------------
def stored_shapes(path: str | Path, which: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (full shape, dtype) of one kind of tensors (model, ema or optimizer), from file headers only."""
    path = Path(path)
    metadata = read_metadata(path)
    if is_distributed_format(metadata):
        check_state_files(path)
        prefix = which + "/"
        return {
            key[len(prefix) :]: (tuple(meta.size), meta.properties.dtype)
            for key, meta in stored_index(path / STATE).items()
            if key.startswith(prefix)
        }
    if not (path / which).is_dir():
        return {}
    tp_size, paths, partition = source_layout(path / which, check_content=False)
    found = {}
    with open_shard(paths[0], check_content=False) as handle:
        for name in handle.keys():
            piece = handle.get_slice(name)
            shape, dim = list(piece.get_shape()), partition.get(name)
            if dim is not None:
                shape[dim] *= tp_size
            found[name] = (tuple(shape), _SAFETENSORS_DTYPES[piece.get_dtype()])
    return found


def stored_kinds(path: str | Path) -> list[str]:
    """The kinds of tensors (model, ema, optimizer) a checkpoint holds, in that order."""
    return [which for which in KINDS if stored_shapes(path, which)]


def iter_checkpoint_tensors(path: str | Path, which: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of a checkpoint's model, ema or optimizer tensors, one at a time, sorted by name.

    Optimizer names are '<moment>/<parameter>' (exp_avg, exp_avg_sq, and step for the step counts)."""
    path = Path(path)
    metadata = read_metadata(path)
    if is_distributed_format(metadata):
        check_state_files(path)
        index = stored_index(path / STATE)
        prefix = which + "/"
        for key in sorted(index):
            if key.startswith(prefix):
                yield key[len(prefix) :], read_tensor(path / STATE, key, index)
        return
    if not (path / which).is_dir():
        return
    yield from iter_full_tensors(path / which)
    scalars = path / which / "scalars.json"
    if which == "optimizer" and scalars.is_file():
        for name, value in sorted(json.loads(scalars.read_text()).items()):
            yield name, torch.tensor(value, dtype=torch.float32)


def read_checkpoint_tensor(path: str | Path, which: str, name: str) -> torch.Tensor:
    """One whole tensor (`name` as stored_shapes lists it) of a checkpoint of either format."""
    path = Path(path)
    if is_distributed_format(read_metadata(path)):
        return read_tensor(path / STATE, f"{which}/{name}")
    _, paths, partition = source_layout(path / which, check_content=False)
    if name not in partition:
        raise ConfigError(f"checkpoint {str(path)!r} stores no {which} tensor {name!r}")
    return read_full_tensor(paths, name, partition[name])


def read_checkpoint_tensors(path: str | Path, which: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of one kind at once (small models and tests; use iter_checkpoint_tensors for large ones)."""
    return dict(iter_checkpoint_tensors(path, which))
