"""Deterministic, resumable, data-parallel micro-batches of (latents, text states) from webdataset shards.

An epoch's order is a pure function of (seed, epoch); a rank's position is just (epoch, samples consumed).
"""

import warnings
from collections import deque
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.shards import decode_sample, iter_raw_samples, resolve_shards
from osp_megatron.data.synthetic import ensure_synthetic_data


@dataclass(frozen=True)
class Chunk:
    """Consecutive stream positions of one rank that fall in one shard: the unit a worker reads."""

    epoch: int
    shard: int
    sample_indices: tuple  # positions of samples in the shard file, in the order they are yielded


def epoch_order(shards, epoch, seed, shuffle):
    """[(shard index, in-shard sample order)] for one epoch: shuffled shards, each shuffled inside."""
    if not shuffle:
        return [(i, np.arange(s.num_samples)) for i, s in enumerate(shards)]
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    # One generator per shard, so a shard's order does not depend on how many shards precede it.
    return [(int(i), np.random.default_rng([seed, epoch, int(i)]).permutation(shards[i].num_samples))
            for i in shard_order]


def samples_per_rank(shards, dp_size):
    """Every rank gets the same number of samples per epoch, so ranks stay in step; the rest is dropped."""
    return sum(s.num_samples for s in shards) // dp_size


def epoch_end(per_rank, start, micro_batch_size):
    """Last stream position (exclusive) of an epoch entered at `start`: only whole micro-batches are used."""
    return start + (per_rank - start) // micro_batch_size * micro_batch_size


def rank_chunks(shards, epoch, seed, shuffle, dp_rank, dp_size, start, stop):
    """Chunks covering positions [start, stop) of this rank's slice of the epoch.

    Rank r owns the contiguous slice [r n, (r + 1) n) of the epoch's sample stream, so ranks are disjoint
    and each reads only about 1/dp_size of the shards.
    """
    base = dp_rank * samples_per_rank(shards, dp_size)
    low, high = base + start, base + stop
    offset = 0
    for shard_index, order in epoch_order(shards, epoch, seed, shuffle):
        if offset >= high:
            break
        count = shards[shard_index].num_samples
        first, last = max(low, offset), min(high, offset + count)
        if first < last:
            yield Chunk(epoch, shard_index, tuple(int(i) for i in order[first - offset:last - offset]))
        offset += count


class ShardStream(IterableDataset):
    """Endless stream of decoded chunks from a given position; chunk k goes to worker k mod num_workers.

    torch's DataLoader takes items from its workers round-robin, so the chunk order is kept exactly.
    """

    def __init__(self, shards, config, micro_batch_size, dp_rank, dp_size, seed, epoch, consumed):
        super().__init__()
        self.shards = shards
        self.config = config
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.epoch, self.consumed = epoch, consumed

    def chunks(self):
        per_rank = samples_per_rank(self.shards, self.dp_size)
        epoch, start = self.epoch, self.consumed
        while True:
            stop = epoch_end(per_rank, start, self.micro_batch_size)
            yield from rank_chunks(self.shards, epoch, self.seed, self.config.shuffle, self.dp_rank, self.dp_size,
                                   start, stop)
            epoch, start = epoch + 1, 0

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        for k, chunk in enumerate(self.chunks()):
            if k % num_workers == worker_id:
                yield self.read_chunk(chunk)

    def read_chunk(self, chunk):
        shard = self.shards[chunk.shard]
        wanted = set(chunk.sample_indices)
        raw_by_index = {}
        # closing() releases the file at once when the wanted samples end before the shard does.
        with closing(iter_raw_samples(shard.path)) as samples:
            for index, raw in enumerate(samples):
                if index in wanted:
                    raw_by_index[index] = raw
                    if len(raw_by_index) == len(wanted):
                        break
        if len(raw_by_index) < len(wanted):
            raise ConfigError(
                f"shard {shard.path}: holds fewer samples than the {shard.num_samples} its index lists "
                f"(sample {max(wanted - set(raw_by_index))} is missing); the shard is truncated or the index is stale"
            )
        cfg = self.config
        decoded = [decode_sample(raw_by_index[i], shard.path, cfg.latent_shape, cfg.text_len, cfg.text_dim)
                   for i in chunk.sample_indices]
        latents, states, lengths, captions = zip(*decoded)
        return {
            "epoch": chunk.epoch,
            "latents": torch.stack(latents),
            "text_states": torch.stack(states),
            "text_lengths": torch.tensor(lengths, dtype=torch.long),
            "captions": list(captions),
            "keys": [raw_by_index[i]["__key__"] for i in chunk.sample_indices],
        }


_TENSOR_FIELDS = ("latents", "text_states", "text_lengths")
_LIST_FIELDS = ("captions", "keys")


class WebDatasetLoader:
    """Endless iterator over micro-batches for one data-parallel rank, with exact resume.

    Each batch: latents [b, C, T, H, W], text_states [b, text_len, text_dim] (zero-padded),
    text_lengths [b], captions and keys (lists of b strings).
    """

    def __init__(self, config, micro_batch_size, dp_rank=0, dp_size=1, seed=0, shards=None):
        config.validate()
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be a positive integer, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.config = config
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shards = list(shards) if shards is not None else resolve_shards(config.path)
        self.num_samples = sum(s.num_samples for s in self.shards)
        self.samples_per_rank = samples_per_rank(self.shards, dp_size)
        if self.samples_per_rank < micro_batch_size:
            raise ConfigError(
                f"data.path {config.path!r} holds {self.num_samples} samples, fewer than dp_size ({dp_size}) x "
                f"micro_batch_size ({micro_batch_size}); add data or lower the batch size"
            )
        self.epoch, self.consumed = 0, 0
        self._batches = None

    @property
    def batches_per_epoch(self):
        return self.samples_per_rank // self.micro_batch_size

    def state_dict(self):
        """The data position: the next batch starts at sample `samples_consumed` of `epoch` on this rank."""
        return {"epoch": self.epoch, "samples_consumed": self.consumed, "seed": self.seed,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "num_samples": self.num_samples}

    def load_state_dict(self, state):
        """Continue from a saved position; the next batches equal those the saved loader would have given."""
        try:
            epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"data loader state must hold integer 'epoch' and 'samples_consumed', got {state!r}"
            ) from exc
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"data loader state was saved with seed {state['seed']}, resuming with seed {self.seed}")
        layout_changed = (state.get("dp_size", self.dp_size) != self.dp_size
                          or state.get("num_samples", self.num_samples) != self.num_samples)
        if layout_changed and consumed > 0:
            # Rank slices depend on dp_size and the data size, so a mid-epoch position saved under another
            # layout names different samples; the rest of that epoch is skipped rather than guessed.
            warnings.warn("data-parallel size or data set size changed since the data loader state was saved; "
                          f"resuming at the start of epoch {epoch + 1}")
            epoch, consumed = epoch + 1, 0
        self.close()
        self.epoch, self.consumed = self._normalised(epoch, consumed)

    def _normalised(self, epoch, consumed):
        if self.samples_per_rank - consumed < self.micro_batch_size:
            return epoch + 1, 0
        return epoch, consumed

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = self._generate()
        return next(self._batches)

    def close(self):
        """Stop worker processes; the next `next()` restarts from the current position."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _chunk_source(self, epoch, consumed):
        stream = ShardStream(self.shards, self.config, self.micro_batch_size, self.dp_rank, self.dp_size,
                             self.seed, epoch, consumed)
        if self.config.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.config.num_workers, prefetch_factor=2))

    def _generate(self):
        self.epoch, self.consumed = self._normalised(self.epoch, self.consumed)
        end = epoch_end(self.samples_per_rank, self.consumed, self.micro_batch_size)
        source = self._chunk_source(self.epoch, self.consumed)
        pending = deque()  # (chunk, offset of its first unused sample)
        available = 0
        try:
            for chunk in source:
                pending.append((chunk, 0))
                available += len(chunk["keys"])
                while available >= self.micro_batch_size:
                    batch = self._take(pending, self.micro_batch_size)
                    available -= self.micro_batch_size
                    if batch["epoch"] != self.epoch:
                        raise RuntimeError(f"data stream out of step: got epoch {batch['epoch']}, at {self.epoch}")
                    del batch["epoch"]
                    self.consumed += self.micro_batch_size
                    if self.consumed == end:
                        self.epoch, self.consumed = self.epoch + 1, 0
                        end = epoch_end(self.samples_per_rank, 0, self.micro_batch_size)
                    yield batch
        finally:
            # Dropping the last reference to a DataLoader iterator stops its worker processes at once.
            source = None

    @staticmethod
    def _take(pending, size):
        pieces = []
        while size > 0:
            chunk, offset = pending.popleft()
            count = min(size, len(chunk["keys"]) - offset)
            pieces.append((chunk, offset, offset + count))
            if offset + count < len(chunk["keys"]):
                pending.appendleft((chunk, offset + count))
            size -= count
        batch = {"epoch": pieces[0][0]["epoch"]}
        for field in _TENSOR_FIELDS:
            batch[field] = torch.cat([chunk[field][a:b] for chunk, a, b in pieces])
        for field in _LIST_FIELDS:
            batch[field] = [item for chunk, a, b in pieces for item in chunk[field][a:b]]
        return batch


def build_data_loader(config, micro_batch_size, dp_rank=0, dp_size=1, seed=0):
    """Validate the config, write the synthetic data set if asked for and absent, and return the loader."""
    config.validate()
    ensure_synthetic_data(config)
    return WebDatasetLoader(config, micro_batch_size, dp_rank, dp_size, seed)
