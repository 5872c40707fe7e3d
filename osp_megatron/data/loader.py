"""Deterministic, resumable, data-parallel micro-batches of (latents, text states) from bucketed shards.

Each global batch is one bucket of one source; rank r takes its micro-batches of it, so the order is layout-free.
"""

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.config import DataConfig
from osp_megatron.data.mixing import (
    GlobalStream,
    LatentBucket,
    SourcePlan,
    StreamPosition,
    bucket_micro_batch_size,
    latent_bucket_name,
)
from osp_megatron.data.shards import (
    SampleError,
    ShardInfo,
    check_text_states,
    decode_sample,
    read_sample_at,
    resolve_shards,
    sample_offsets,
)

STATE_FORMAT = "osp-loader-v2"


@dataclass(frozen=True)
class MicroBatchTask:
    """What one micro-batch reads: rows (shard, sample) of one source, their global sample indices, spares."""

    source: int
    bucket: LatentBucket
    rows: np.ndarray
    spares: np.ndarray
    sample_indices: np.ndarray
    position: dict  # the loader position once this micro-batch is consumed


@functools.lru_cache(maxsize=4096)
def _scanned_offsets(path):
    return sample_offsets(path)


def _stack(tensors):
    """torch.stack, without the copy when there is one tensor (480P micro-batches are often one sample)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class MicroBatchReader:
    """Reads a MicroBatchTask: random access to each sample's bytes, decoding, replacing bad samples by spares."""

    def __init__(self, sources: list[list[ShardInfo]], config: DataConfig):
        self.sources, self.config = sources, config
        self.warned = set()

    def offsets(self, shard: ShardInfo) -> tuple[int, ...]:
        if shard.offsets is not None:
            return shard.offsets
        try:
            return _scanned_offsets(shard.path)
        except ConfigError as exc:
            raise SampleError(str(exc)) from exc

    def read(
        self, source: int, row: np.ndarray, latent_shape: tuple[int, ...], handles: dict[str, BinaryIO]
    ) -> tuple[tuple, str, int]:
        shard = self.sources[source][int(row[0])]
        offsets = self.offsets(shard)
        sample = int(row[1])
        if sample + 1 >= len(offsets):
            raise SampleError(
                f"shard {shard.path}: holds {max(len(offsets) - 1, 0)} samples, fewer than the "
                f"{shard.num_samples} its index lists; the shard is truncated or the index is stale"
            )
        if shard.path not in handles:
            try:
                handles[shard.path] = open(shard.path, "rb")
            except OSError as exc:
                raise SampleError(f"shard {shard.path}: cannot be opened ({exc})") from exc
        raw = read_sample_at(handles[shard.path], offsets[sample], offsets[sample + 1], shard.path)
        cfg = self.config
        decoded = decode_sample(raw, shard.path, latent_shape, cfg.text_len, cfg.text_dim)
        return decoded, raw["__key__"], offsets[sample + 1] - offsets[sample]

    def __call__(self, task: MicroBatchTask) -> dict:
        spares = iter(task.spares)
        samples, bad, bytes_read = [], 0, 0
        handles = {}
        try:
            for row in task.rows:
                while True:
                    try:
                        decoded, key, size = self.read(task.source, row, task.bucket.latent_shape, handles)
                        break
                    except SampleError as exc:
                        bad += 1
                        if (task.source, *row) not in self.warned:
                            self.warned.add((task.source, *row))
                            warnings.warn(f"skipping a bad sample: {exc}")
                        row = next(spares, None)
                        if row is None:
                            raise ConfigError(
                                f"data source {task.source}: {len(task.spares)} bad samples in a row in bucket "
                                f"{task.bucket.name} (last: {exc}); the data set is broken, see `osp-data inspect "
                                "--check`"
                            ) from exc
                samples.append((decoded, key))
                bytes_read += size
        finally:
            for handle in handles.values():
                handle.close()
        latents, states, lengths, captions = zip(*(d for d, _ in samples))
        return {
            "latents": _stack(latents),
            "text_states": _stack(states),
            "text_lengths": torch.tensor(lengths, dtype=torch.long),
            "captions": list(captions),
            "keys": [key for _, key in samples],
            "sample_indices": torch.from_numpy(task.sample_indices.copy()),
            "bucket": task.bucket.name,
            "source": task.source,
            "bad_samples": bad,
            "bytes_read": int(bytes_read),
            "_position": task.position,
        }


class MicroBatchStream(IterableDataset):
    """This rank's micro-batch tasks from a position, read; task k goes to worker k mod num_workers.

    torch's DataLoader takes items from its workers round-robin, so the order is kept exactly.
    """

    def __init__(self, loader: "WebDatasetLoader", position: StreamPosition, micro_batch: int):
        super().__init__()
        self.loader, self.position, self.micro_batch = loader, position, micro_batch

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        reader = MicroBatchReader(self.loader.sources, self.loader.config)
        for k, task in enumerate(self.loader.tasks(self.position, self.micro_batch)):
            if k % num_workers == worker_id:
                yield reader(task)


class WebDatasetLoader:
    """Endless iterator over micro-batches for one data-parallel rank, with exact, layout-free resume.

    Each batch: latents [b, C, T, H, W] (one bucket), text_states [b, text_len, text_dim] (zero-padded),
    text_lengths [b], sample_indices [b] (int64 positions in the global stream), captions, keys, bucket name,
    source index, bad_samples (bad entries replaced in this batch) and bytes_read.
    """

    def __init__(
        self,
        config: DataConfig,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        global_batch_size: int | None = None,
        patch_size: tuple[int, int, int] = (1, 2, 2),
    ):
        config.validate()
        global_batch_size = global_batch_size or micro_batch_size * dp_size
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be a positive integer, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        micro_batches = global_batch_size // micro_batch_size
        if global_batch_size % micro_batch_size or micro_batches % dp_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} must be a multiple of "
                f"train.micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}"
            )
        self.config, self.seed = config, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batches, self.accumulation = micro_batches, micro_batches // dp_size
        self.sources = [resolve_shards(path) for path, _ in config.source_list()]
        for number, ((path, _), shards) in enumerate(zip(config.source_list(), self.sources)):
            key = f"data.sources[{number}].path" if config.sources else "data.path"
            check_text_states(shards, config.text_len, config.text_dim, f"{key} {path!r}")
        shapes = [[self._shard_shape(shard) for shard in shards] for shards in self.sources]
        names = {}
        for shards, shard_shapes in zip(self.sources, shapes):
            for shard, shape in zip(shards, shard_shapes):
                names.setdefault(shape, {latent_bucket_name(shape)})
                if shard.bucket:
                    names[shape].add(shard.bucket)
        self.buckets = {}
        for shape, bucket_names in sorted(names.items()):
            ordered = (latent_bucket_name(shape), *sorted(bucket_names - {latent_bucket_name(shape)}))
            micro = bucket_micro_batch_size(shape, ordered, config, micro_batch_size, patch_size)
            self.buckets[shape] = LatentBucket(shape, ordered, micro, micro * micro_batches)
        plans = [
            SourcePlan(i, shards, s, self.buckets, seed, config.shuffle)
            for i, (shards, s) in enumerate(zip(self.sources, shapes))
        ]
        self.stream = GlobalStream(plans, [w for _, w in config.source_list()])
        self.num_samples = sum(s.num_samples for shards in self.sources for s in shards)
        self.position, self.micro_batch = self.stream.start(), 0
        self._batches = None

    def _shard_shape(self, shard):
        """Shards carry their shape in the index (or their first sample); data.latent_* is the fallback."""
        if shard.latent_shape is not None:
            return tuple(int(s) for s in shard.latent_shape)
        return tuple(self.config.latent_shape)

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """The latent shapes [C, T, H, W] of every bucket this loader yields."""
        return sorted(self.buckets)

    def tasks(self, position: StreamPosition, micro_batch: int) -> Iterator[MicroBatchTask]:
        """This rank's MicroBatchTasks from `position` (skipping its first `micro_batch` of that global batch)."""
        for batch, before, after in self.stream.batches(position):
            size = batch.bucket.micro_batch_size
            for a in range(micro_batch, self.accumulation):
                j = self.dp_rank * self.accumulation + a
                last = a == self.accumulation - 1
                state = dict((after if last else before).as_dict(), micro_batch=0 if last else a + 1)
                yield MicroBatchTask(
                    batch.source,
                    batch.bucket,
                    batch.members[j * size : (j + 1) * size],
                    batch.spares(self.config.max_bad_in_a_row),
                    before.global_samples + j * size + np.arange(size, dtype=np.int64),
                    state,
                )
            micro_batch = 0

    def state_dict(self) -> dict:
        """The position in the global stream; it names the same samples under any data-parallel layout."""
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            **self.position.as_dict(),
            "micro_batch": self.micro_batch,
            "dp_size": self.dp_size,
            "accumulation": self.accumulation,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the next batches equal those the saved loader would have given."""
        self.close()
        if state.get("format") != STATE_FORMAT:
            self._load_legacy_state(state)
            return
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"data loader state was saved with seed {state['seed']}, resuming with seed {self.seed}")
        if state.get("num_samples", self.num_samples) != self.num_samples:
            warnings.warn(
                f"the data set held {state['num_samples']} samples when the loader state was saved and "
                f"holds {self.num_samples} now; the saved position names different samples"
            )
        try:
            sources = [[int(v) for v in place] for place in state["sources"]]
            position = StreamPosition(int(state["global_batches"]), int(state["global_samples"]), sources)
            micro_batch = int(state.get("micro_batch", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"data loader state is malformed ({exc!r}): {state!r}") from exc
        if len(sources) != len(self.sources):
            raise ConfigError(f"data loader state has {len(sources)} sources, data.sources has {len(self.sources)}")
        if micro_batch and (state.get("dp_size"), state.get("accumulation")) != (self.dp_size, self.accumulation):
            # A global batch half consumed under another layout: its remaining micro-batches are not this rank's.
            warnings.warn(
                "data loader state was saved in the middle of a global batch under another data-parallel "
                "layout; resuming at the next global batch"
            )
            _, _, position = next(self.stream.batches(position))
            micro_batch = 0
        self.position, self.micro_batch = self.stream.normalised(position), micro_batch

    def _load_legacy_state(self, state):
        try:
            epoch = int(state["epoch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"data loader state must be an '{STATE_FORMAT}' state or hold an integer 'epoch', got {state!r}"
            ) from exc
        warnings.warn(
            f"data loader state was saved by an earlier version (per-rank positions); resuming at the "
            f"start of epoch {epoch + 1} of the first source"
        )
        position = self.stream.start()
        plan = self.stream.plans[0]
        position.sources[0] = [epoch + 1, 0, 0]
        position.global_batches = (epoch + 1) * plan.batches_per_epoch
        position.global_samples = sum(b.bucket.global_batch_size for b in plan.epoch(0)) * (epoch + 1)
        self.position, self.micro_batch = position, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = self._generate()
        return next(self._batches)

    def close(self) -> None:
        """Stop worker processes; the next `next()` restarts from the current position."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _generate(self):
        stream = MicroBatchStream(self, self.position, self.micro_batch)
        source = (
            iter(stream)
            if self.config.num_workers == 0
            else iter(DataLoader(stream, batch_size=None, num_workers=self.config.num_workers, prefetch_factor=2))
        )
        try:
            for batch in source:
                position = batch.pop("_position")
                self.micro_batch = position.pop("micro_batch")
                self.position = StreamPosition(**position)
                yield batch
        finally:
            # Dropping the last reference to a DataLoader iterator stops its worker processes at once.
            source = None


def build_data_loader(
    config: DataConfig,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    global_batch_size: int | None = None,
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> WebDatasetLoader:
    """Validate the config and return the loader (a synthetic set must exist already:
    osp_megatron.engine.data.ensure_synthetic_data writes it)."""
    config.validate()
    return WebDatasetLoader(config, micro_batch_size, dp_rank, dp_size, seed, global_batch_size, patch_size)
