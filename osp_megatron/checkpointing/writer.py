"""Publishing training checkpoints: all ranks write their pieces in parallel, rank 0 publishes atomically.

step_X.tmp/ receives state/ (torch.distributed.checkpoint), ranks/ (per-rank state) and manifest.json; then
metadata.json, the completion mark, and one rename each for the folder and `latest`. With asynchronous saving
training continues once the tensors are in host memory, and publication happens in a background thread.
"""

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from osp_megatron.checkpointing.distributed import save_tensors
from osp_megatron.checkpointing.integrity import file_digest, write_manifest
from osp_megatron.checkpointing.metadata import DISTRIBUTED_FORMAT, METADATA, STATE

RANKS = "ranks"


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / RANKS / f"rank{rank:05d}.pt"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_written_by(folder: Path, rank: int) -> list[str]:
    """The files of a checkpoint folder that `rank` wrote: its state pieces and state file (rank 0: the
    state index too), relative to `folder`."""
    names = [str(p.relative_to(folder)) for p in sorted((folder / STATE).glob(f"__{rank}_*"))]
    names.append(str(rank_file(folder, rank).relative_to(folder)))
    if rank == 0 and (folder / STATE / ".metadata").is_file():
        names.append(f"{STATE}/.metadata")
    return names


def publish(
    tmp: Path,
    final: Path,
    digests: dict,
    metadata: dict,
    keep_last: int | None,
    complete_checkpoints,
    update_latest: bool = True,
) -> None:
    """Rank 0: manifest, metadata.json (the completion mark), rename into place, point `latest` at it, rotate.

    A crash before the rename leaves only the .tmp folder, which nothing loads; a crash between the renames
    leaves `latest` on the previous checkpoint, and loaders fall back to scanning for the newest complete one.
    """
    write_manifest(tmp, digests)
    write_text_atomic(tmp / METADATA, json.dumps(metadata, indent=2, default=str))
    root = final.parent
    if final.exists():
        stale = root / (final.name + ".old")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    if update_latest:
        write_text_atomic(root / "latest", final.name)
    if keep_last:
        for old in complete_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


class CheckpointWriter:
    """Writes the checkpoints of one run; with `asynchronous`, at most one is in flight at a time.

    Collective: every rank calls `save` at the same step. The background part of an asynchronous save talks
    over its own gloo group, so it never interleaves with the training's collectives.
    """

    def __init__(
        self,
        root: Path,
        keep_last: int | None = None,
        asynchronous: bool = False,
        complete_checkpoints=None,
        update_latest: bool = True,
    ):
        self.root = Path(root)
        self.update_latest = update_latest
        self.keep_last = keep_last
        self.asynchronous = asynchronous
        self.complete_checkpoints = complete_checkpoints or (lambda: [])
        self._group = None
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def save(self, name: str, tensors: dict, rank_state: dict, metadata: dict) -> Path:
        """Write checkpoint `name` (a step folder name); returns its final path (published on return, or,
        asynchronously, once `wait()` returns)."""
        self.wait()
        final, tmp = self.root / name, self.root / (name + ".tmp")
        rank = dist.get_rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / RANKS).mkdir(parents=True)
        dist.barrier()
        torch.save(rank_state, rank_file(tmp, rank))
        info = dict(metadata, format=DISTRIBUTED_FORMAT, saved_at=time.time())
        if not self.asynchronous:
            save_tensors(tmp / STATE, tensors)
            self._finish(None, tmp, final, info, group=None)
            return final
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        written = save_tensors(tmp / STATE, tensors, process_group=self._group, asynchronous=True)
        self._pending = self._worker.submit(self._finish, written, tmp, final, info, self._group)
        return final

    def _finish(self, written: Future | None, tmp: Path, final: Path, metadata: dict, group) -> None:
        if written is not None:
            written.result()
        rank = dist.get_rank()
        digests = {name: file_digest(tmp / name) for name in files_written_by(tmp, rank)}
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(digests, gathered, dst=0, group=group)
        if rank == 0:
            merged = {name: digest for part in gathered for name, digest in part.items()}
            publish(tmp, final, merged, metadata, self.keep_last, self.complete_checkpoints, self.update_latest)
        dist.barrier(group=group)

    def wait(self) -> None:
        """Block until the checkpoint in flight (if any) is published; re-raises its failure."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def close(self) -> None:
        self.wait()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
