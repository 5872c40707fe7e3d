"""Checkpoints read and written in one plain process, tensor by tensor, whatever their format and layout.

Used by osp-ckpt (inspect, export, average, import) and tests; free of megatron-core, so tools start fast.
"""

import contextlib
import functools
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from osp_megatron.checkpointing.integrity import CheckpointCorruptError, read_manifest, verify_checkpoint
from osp_megatron.checkpointing.metadata import STATE, is_distributed_format, read_metadata
from osp_megatron.checkpointing.sharded import iter_full_tensors, open_shard, read_full_tensor, source_layout
from osp_megatron.config.errors import ConfigError

KINDS = ("model", "ema", "optimizer")
# iter_checkpoint_tensors loads this many bytes of tensors at a time: one DCP load per group of small tensors.
READ_BATCH_BYTES = 256 * 2**20
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


class _IndexedReader(FileSystemReader):
    """A DCP folder's reader that unpickles the folder's index (.metadata: every tensor's pieces) once for all
    the loads it serves, instead of once per load."""

    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


@functools.lru_cache(maxsize=4)
def _cached_reader(folder: str, stamp: tuple) -> _IndexedReader:
    return _IndexedReader(Path(folder))


def _reader(folder: Path) -> _IndexedReader:
    """The folder's reader, reused while its index file is unchanged (same size and modification time)."""
    try:
        stat = (Path(folder) / ".metadata").stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        return _IndexedReader(folder)  # read_metadata names the problem
    return _cached_reader(str(Path(folder).resolve()), stamp)


def stored_index(folder: Path) -> dict[str, TensorStorageMetadata]:
    """key -> storage metadata (full size, dtype, stored pieces) of every tensor of a DCP folder."""
    try:
        metadata = _reader(folder).read_metadata()
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{str(folder)!r} is not a readable torch.distributed.checkpoint folder ({exc})") from exc
    return {
        key: value for key, value in metadata.state_dict_metadata.items() if isinstance(value, TensorStorageMetadata)
    }


def read_tensors(folder: Path, keys: list[str], index: dict | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors of a DCP folder, each assembled from its stored pieces, in one load (reads only those
    bytes)."""
    index = index if index is not None else stored_index(folder)
    missing = [key for key in keys if key not in index]
    if missing:
        raise ConfigError(f"{str(folder)!r} stores no tensor {missing[0]!r}")
    targets = {key: torch.empty(tuple(index[key].size), dtype=index[key].properties.dtype) for key in keys}
    try:
        with _one_process():
            dcp.load(targets, storage_reader=_reader(folder), no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP's own error (a BaseException) for an unreadable piece
        names = keys[0] if len(keys) == 1 else f"{len(keys)} tensors from {keys[0]!r}"
        raise CheckpointCorruptError(f"{folder}: {names} cannot be read ({exc})") from exc
    return targets


def read_tensor(folder: Path, key: str, index: dict | None = None) -> torch.Tensor:
    """One whole tensor of a DCP folder, assembled from its stored pieces (reads only those bytes)."""
    return read_tensors(folder, [key], index)[key]


def _batches(keys: list[str], index: dict, budget: int) -> Iterator[list[str]]:
    """Consecutive keys in groups of at most `budget` bytes (a larger tensor alone)."""
    batch, size = [], 0
    for key in keys:
        meta = index[key]
        nbytes = math.prod(meta.size) * meta.properties.dtype.itemsize
        if batch and size + nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(key)
        size += nbytes
    if batch:
        yield batch


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
        keys = [key for key in sorted(index) if key.startswith(prefix)]
        for batch in _batches(keys, index, READ_BATCH_BYTES):
            tensors = read_tensors(path / STATE, batch, index)
            for key in batch:
                yield key[len(prefix) :], tensors.pop(key)
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
