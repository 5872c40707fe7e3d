"""Typed configuration of the training data: where the shards are, how sources mix and how buckets batch.

Built from the `data:` section of a YAML file; `validate()` names the dotted key of any bad value.
"""

from dataclasses import dataclass, field
from typing import Literal

from osp_megatron.config.errors import ConfigError


def _check_path(path, key, allow_list=True):
    if isinstance(path, str):
        if not path:
            raise ConfigError(f"{key} must be a folder or a list of shard globs, got an empty string")
    elif isinstance(path, (list, tuple)) and allow_list:
        if not path or not all(isinstance(p, str) and p for p in path):
            raise ConfigError(f"{key} must be a non-empty list of shard globs (strings), got {path!r}")
    else:
        raise ConfigError(f"{key} must be a folder (string) or a list of shard globs, got {path!r}")


@dataclass
class DataSource:
    """One data set of a weighted mixture: its shards and its share of the samples."""

    path: str | list[str] = ""
    weight: float = 1.0

    def validate(self, prefix: str = "data.sources[]") -> "DataSource":
        _check_path(self.path, f"{prefix}.path")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ConfigError(f"{prefix}.weight must be a positive number, got {self.weight!r}")
        return self


@dataclass
class BucketBatchSize:
    """Micro-batch size of one bucket, named as `osp-data inspect` prints it (e.g. 480x832 or 21x60x104)."""

    bucket: str = ""
    micro_batch_size: int = 1

    def validate(self, prefix: str = "data.bucket_batch_sizes[]") -> "BucketBatchSize":
        if not isinstance(self.bucket, str) or not self.bucket:
            raise ConfigError(f"{prefix}.bucket must name a bucket (e.g. 480x832), got {self.bucket!r}")
        if (
            isinstance(self.micro_batch_size, bool)
            or not isinstance(self.micro_batch_size, int)
            or self.micro_batch_size < 1
        ):
            raise ConfigError(f"{prefix}.micro_batch_size must be a positive integer, got {self.micro_batch_size!r}")
        return self


@dataclass
class DataConfig:
    """Pre-encoded (latent, text-state) webdataset shards; the latent_* defaults match Wan2.1 480P, 81 frames."""

    # A folder of shards (with an optional index.json) or a list of shard globs.
    path: str | list[str] = "data/shards"
    # Several data sets mixed by weight (share of samples); when given, `path` is not read.
    sources: list[DataSource] = field(default_factory=list)
    # Micro-batch size per bucket: an explicit size, else tokens_per_micro_batch // the bucket's DiT tokens
    # (at least 1) when tokens_per_micro_batch > 0, else train.micro_batch_size.
    bucket_batch_sizes: list[BucketBatchSize] = field(default_factory=list)
    tokens_per_micro_batch: int = 0
    # Held-out shards for train.eval_interval (a folder or globs that training does not read). With `synthetic`
    # and train.eval_interval set, a held-out synthetic set of train.eval_samples is generated into this folder.
    eval_path: str | list[str] | None = None
    # Generate a learnable synthetic data set into `path` when it holds no complete one yet.
    synthetic: bool = False
    synthetic_num_samples: int = 1024
    synthetic_samples_per_shard: int = 128
    # Seeds the captions, the noise and the tiny text encoder; sampling must use the same encoder seed.
    synthetic_seed: int = 0
    # Which latents the synthetic set holds: "tiny-random" analytic blobs, or "tiny-block" the tiny block VAE's
    # latents of rendered pixel videos. In a job config it follows model.vae.
    synthetic_vae: Literal["tiny-random", "tiny-block"] = "tiny-random"
    # Shapes of synthetic data; real shards carry their own (one per bucket) and these are not used.
    latent_channels: int = 16
    latent_frames: int = 21
    latent_height: int = 60
    latent_width: int = 104
    text_len: int = 512
    text_dim: int = 4096
    # Worker processes that read and decode shards; 0 reads in the training process.
    num_workers: int = 0
    shuffle: bool = True
    # A bad sample is replaced by the next sample of its bucket; this many bad ones in a row is an error.
    max_bad_in_a_row: int = 64

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, self.latent_frames, self.latent_height, self.latent_width)

    def source_list(self) -> list[tuple[str | list[str], float]]:
        """[(path, weight)]: the mixture, or the single `path` with weight 1."""
        if self.sources:
            return [(s.path, float(s.weight)) for s in self.sources]
        return [(self.path, 1.0)]

    def validate(self, prefix: str = "data") -> "DataConfig":
        """Raise ConfigError naming `prefix.key` for the first invalid field; return self."""
        _check_path(self.path, f"{prefix}.path")
        if self.eval_path is not None:
            _check_path(self.eval_path, f"{prefix}.eval_path")
        if self.synthetic and not isinstance(self.path, str):
            raise ConfigError(f"{prefix}.path must be a single folder when {prefix}.synthetic is true, got a list")
        if self.synthetic and self.eval_path is not None and self.eval_path == self.path:
            raise ConfigError(
                f"{prefix}.eval_path must differ from {prefix}.path: the held-out set is generated "
                f"into a folder of its own"
            )
        if self.synthetic and self.sources:
            raise ConfigError(
                f"{prefix}.sources cannot be combined with {prefix}.synthetic (synthetic data is "
                f"written to {prefix}.path)"
            )
        for i, source in enumerate(self.sources):
            source.validate(f"{prefix}.sources[{i}]")
        for i, entry in enumerate(self.bucket_batch_sizes):
            entry.validate(f"{prefix}.bucket_batch_sizes[{i}]")
        for key in ("synthetic", "shuffle"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{prefix}.{key} must be true or false, got {getattr(self, key)!r}")
        positive = (
            "synthetic_num_samples",
            "synthetic_samples_per_shard",
            "latent_channels",
            "latent_frames",
            "latent_height",
            "latent_width",
            "text_len",
            "text_dim",
            "max_bad_in_a_row",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{prefix}.{key} must be a positive integer, got {value!r}")
        for key in ("num_workers", "synthetic_seed", "tokens_per_micro_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{prefix}.{key} must be a non-negative integer, got {value!r}")
        return self
