"""The global sample stream: one-bucket global batches from weighted sources, a pure function of the seed.

Position g of the stream is the same sample whatever the data-parallel size, loader workers or accumulation.
"""

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.config import DataConfig
from osp_megatron.data.shards import ShardInfo


def latent_bucket_name(latent_shape: tuple[int, ...]) -> str:
    """'T x H x W' of a latent [C, T, H, W]: the bucket name the loader uses when no pixel name is known."""
    return "x".join(str(s) for s in latent_shape[1:])


@dataclass(frozen=True)
class LatentBucket:
    """Samples of one latent shape, batched `micro_batch_size` at a time (`global_batch_size` per step)."""

    latent_shape: tuple
    names: tuple  # latent name first, then the pixel bucket names of its shards
    micro_batch_size: int
    global_batch_size: int

    @property
    def name(self) -> str:
        return self.names[-1]


def bucket_micro_batch_size(
    latent_shape: tuple[int, ...],
    names: tuple[str, ...],
    config: DataConfig,
    default: int,
    patch_size: tuple[int, int, int],
) -> int:
    """data.bucket_batch_sizes entry, else data.tokens_per_micro_batch // DiT tokens, else `default`."""
    for entry in config.bucket_batch_sizes:
        if entry.bucket in names:
            return entry.micro_batch_size
    if config.tokens_per_micro_batch:
        tokens = math.prod(s // p for s, p in zip(latent_shape[1:], patch_size))
        return max(1, config.tokens_per_micro_batch // tokens)
    return default


@dataclass(frozen=True)
class GlobalBatch:
    """One step's samples: rows (shard, sample) of one source and bucket, plus the rows that replace bad ones."""

    source: int
    bucket: LatentBucket
    members: np.ndarray  # [global_batch_size, 2]
    order: np.ndarray  # the bucket's epoch order, for spares
    offset: int  # position of `members` in `order`

    def spares(self, count: int) -> np.ndarray:
        """The next `count` rows of the bucket's epoch order after this batch (cyclic)."""
        if len(self.order) == 0:
            return self.members[:0]
        picks = (self.offset + self.bucket.global_batch_size + np.arange(count)) % len(self.order)
        return self.order[picks]


class SourcePlan:
    """The endless batch sequence of one source: each epoch shuffles every bucket's samples, cuts them into
    one-bucket global batches (an incomplete last batch waits for another epoch), and shuffles the batches."""

    def __init__(
        self,
        index: int,
        shards: list[ShardInfo],
        shapes: list[tuple[int, ...]],
        buckets: dict[tuple[int, ...], LatentBucket],
        seed: int,
        shuffle: bool,
    ):
        self.index, self.seed, self.shuffle = index, seed, shuffle
        self.buckets = buckets
        rows = {}
        for shard_index, (shard, shape) in enumerate(zip(shards, shapes)):
            rows.setdefault(shape, []).extend((shard_index, i) for i in range(shard.num_samples))
        self.members = {shape: np.array(r, dtype=np.int64).reshape(-1, 2) for shape, r in sorted(rows.items())}
        self.batches_per_epoch = sum(
            len(members) // buckets[shape].global_batch_size for shape, members in self.members.items()
        )
        self._cached = (None, None)

    def warn_unused_buckets(self) -> None:
        """One warning per bucket with fewer samples than its global batch: those samples are never used."""
        for shape, members in self.members.items():
            size = self.buckets[shape].global_batch_size
            if len(members) < size:
                warnings.warn(
                    f"data source {self.index}: bucket {self.buckets[shape].name} holds {len(members)} "
                    f"samples, fewer than its global batch of {size}; its samples are not used (every "
                    "global batch is one bucket)"
                )

    def bucket_fill(self) -> str:
        """'64x64: 2 of 8, 64x96: 3 of 8': each bucket's samples against its global batch size."""
        return ", ".join(
            f"{self.buckets[shape].name}: {len(members)} of {self.buckets[shape].global_batch_size}"
            for shape, members in self.members.items()
        )

    def epoch(self, epoch: int) -> list[GlobalBatch]:
        """The epoch's GlobalBatches in order."""
        if self._cached[0] == epoch:
            return self._cached[1]
        batches = []
        for bucket_number, (shape, members) in enumerate(self.members.items()):
            order = members
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.index, epoch, bucket_number])
                order = members[rng.permutation(len(members))]
            size = self.buckets[shape].global_batch_size
            for offset in range(0, len(order) - size + 1, size):
                batches.append(
                    GlobalBatch(self.index, self.buckets[shape], order[offset : offset + size], order, offset)
                )
        if self.shuffle:
            permutation = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(batches))
            batches = [batches[i] for i in permutation]
        else:
            batches.sort(key=lambda b: tuple(b.members[0]))
        self._cached = (epoch, batches)
        return batches


@dataclass
class StreamPosition:
    """Where the global stream stands: counted in global batches and samples, plus each source's place."""

    global_batches: int = 0
    global_samples: int = 0
    sources: list = field(default_factory=list)  # per source [epoch, batch in epoch, samples taken]

    def copy(self) -> "StreamPosition":
        return StreamPosition(self.global_batches, self.global_samples, [list(s) for s in self.sources])

    def as_dict(self) -> dict:
        return {
            "global_batches": self.global_batches,
            "global_samples": self.global_samples,
            "sources": [list(s) for s in self.sources],
        }


class GlobalStream:
    """Interleaves the sources' batch sequences so each source's share of samples follows its weight.

    The next batch comes from the source with the fewest samples taken per unit of weight (ties: the first),
    so shares are exact to within one global batch at every point of the stream.
    """

    def __init__(self, plans: list[SourcePlan], weights: list[float]):
        for plan in plans:
            if plan.batches_per_epoch:
                plan.warn_unused_buckets()
            else:
                raise ConfigError(
                    f"data source {plan.index} holds no bucket with a full global batch of samples "
                    f"(samples per bucket: {plan.bucket_fill()}); every global batch is one bucket, so "
                    "add data or lower train.global_batch_size (docs/data.md, 'How much data')"
                )
        self.plans, self.weights = plans, [float(w) for w in weights]

    def start(self) -> StreamPosition:
        return StreamPosition(0, 0, [[0, 0, 0] for _ in self.plans])

    def normalised(self, position: StreamPosition) -> StreamPosition:
        """A position whose per-source batch numbers fall inside their epochs."""
        position = position.copy()
        for plan, place in zip(self.plans, position.sources):
            while place[1] >= plan.batches_per_epoch:
                place[0], place[1] = place[0] + 1, place[1] - plan.batches_per_epoch
        return position

    def batches(self, position: StreamPosition) -> Iterator[tuple[GlobalBatch, StreamPosition, StreamPosition]]:
        """Yield (GlobalBatch, position before it, position after it) endlessly from `position`."""
        position = self.normalised(position)
        while True:
            source = min(range(len(self.plans)), key=lambda s: (position.sources[s][2] / self.weights[s], s))
            epoch, number, _ = position.sources[source]
            batch = self.plans[source].epoch(epoch)[number]
            after = position.copy()
            after.global_batches += 1
            after.global_samples += batch.bucket.global_batch_size
            after.sources[source] = [epoch, number + 1, position.sources[source][2] + batch.bucket.global_batch_size]
            after = self.normalised(after)
            yield batch, position, after
            position = after
