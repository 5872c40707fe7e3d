"""Held-out validation loss: the flow-matching loss on a fixed set of samples with fixed noise and timesteps.

Every evaluation draws the same noise and timesteps for the same samples (seeded by each sample's position in
the held-out set), so its curve moves only with the weights, whatever the number of ranks.
"""

from collections import defaultdict

import torch
import torch.distributed as dist

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.shards import SampleError, check_text_states, decode_sample, iter_raw_samples, resolve_shards
from osp_megatron.training.flow_matching import PerSampleNoise, flow_matching_losses

# Offset of the evaluation noise stream from the training seed, so they never coincide.
EVAL_SEED_OFFSET = 7_777_777


def load_held_out(data_config, path, num_samples: int, dp_rank: int, dp_size: int) -> list[tuple]:
    """This data-parallel rank's share of the first `num_samples` samples of `path` (in shard order), decoded,
    as (latent, text states, position in the held-out set).

    Every rank gets the same count (num_samples // dp_size), so the evaluation collectives stay in step.
    """
    per_rank = num_samples // dp_size
    if per_rank < 1:
        raise ConfigError(f"train.eval_samples={num_samples} is smaller than the data-parallel size {dp_size}")
    wanted = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    samples, position = [], 0
    shards = resolve_shards(path)
    check_text_states(shards, data_config.text_len, data_config.text_dim, f"data.eval_path {path!r}")
    for shard in shards:
        for raw in iter_raw_samples(shard.path):
            if position in wanted:
                # Real shards carry their bucket's shape in the index; data.latent_* describe synthetic data.
                try:
                    latent, text, _, _ = decode_sample(
                        raw,
                        shard.path,
                        shard.latent_shape or data_config.latent_shape,
                        data_config.text_len,
                        data_config.text_dim,
                    )
                except SampleError as exc:
                    raise ConfigError(f"data.eval_path: {exc}") from exc
                samples.append((latent, text, position))
            position += 1
            if position >= wanted.stop:
                return samples
    raise ConfigError(
        f"data.eval_path {path!r} holds {position} samples; train.eval_samples={num_samples} asks for more"
    )


class HeldOutLoss:
    """Callable: model -> mean held-out loss over all data-parallel ranks (collective)."""

    def __init__(
        self, samples: list[tuple], micro_batch_size: int, seed: int, train_config, device, group=None, dp_size: int = 1
    ):
        # Micro-batches of one latent shape each (a data set may hold several resolutions).
        by_shape = defaultdict(list)
        for sample in samples:
            by_shape[tuple(sample[0].shape)].append(sample)
        self.batches = []
        for same in by_shape.values():
            for start in range(0, len(same), micro_batch_size):
                chunk = same[start : start + micro_batch_size]
                self.batches.append(
                    (
                        torch.stack([c[0] for c in chunk]),
                        torch.stack([c[1] for c in chunk]),
                        torch.tensor([c[2] for c in chunk], dtype=torch.int64),
                    )
                )
        self.count = len(samples)
        self.seed = seed + EVAL_SEED_OFFSET
        self.train_config = train_config
        self.device = device
        self.group, self.dp_size = group, dp_size

    @torch.no_grad()
    def __call__(self, model, autocast) -> float:
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        cfg = self.train_config
        try:
            for latents, text, positions in self.batches:
                with autocast():
                    losses, _ = flow_matching_losses(
                        model,
                        latents.to(self.device),
                        text.to(self.device),
                        PerSampleNoise(self.seed, positions),
                        cfg.timestep_shift,
                        cfg.logit_mean,
                        cfg.logit_std,
                    )
                total += losses.double().sum()
        finally:
            model.train(was_training)
        if self.dp_size > 1:
            dist.all_reduce(total, group=self.group)
        return float(total) / (self.count * self.dp_size)
