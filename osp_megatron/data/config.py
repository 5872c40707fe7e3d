"""Typed configuration of the training data: where the shards are and what shapes they must hold.

Built from the `data:` section of a YAML file; `validate()` names the dotted key of any bad value.
"""

from dataclasses import dataclass
from typing import Optional

from osp_megatron.config.errors import ConfigError


@dataclass
class DataConfig:
    """Pre-encoded (latent, text-state) webdataset shards; the defaults match Wan2.1 480P, 81 frames."""

    # A folder of shard-*.tar (with an optional index.json) or a list of shard globs.
    path: str | list[str] = "data/shards"
    # Held-out shards for train.eval_interval (a folder or globs that training does not read).
    eval_path: Optional[str | list[str]] = None
    # Generate a learnable synthetic data set into `path` when it holds no complete one yet.
    synthetic: bool = False
    synthetic_num_samples: int = 1024
    synthetic_samples_per_shard: int = 128
    # Seeds the captions, the noise and the tiny text encoder; sampling must use the same encoder seed.
    synthetic_seed: int = 0
    latent_channels: int = 16
    latent_frames: int = 21
    latent_height: int = 60
    latent_width: int = 104
    text_len: int = 512
    text_dim: int = 4096
    # Worker processes that read and decode shards; 0 reads in the training process.
    num_workers: int = 0
    shuffle: bool = True

    @property
    def latent_shape(self):
        return (self.latent_channels, self.latent_frames, self.latent_height, self.latent_width)

    def validate(self, prefix="data"):
        """Raise ConfigError naming `prefix.key` for the first invalid field; return self."""
        if isinstance(self.path, str):
            if not self.path:
                raise ConfigError(f"{prefix}.path must be a folder or a list of shard globs, got an empty string")
        elif isinstance(self.path, (list, tuple)):
            if not self.path or not all(isinstance(p, str) and p for p in self.path):
                raise ConfigError(f"{prefix}.path must be a non-empty list of shard globs (strings), got {self.path!r}")
            if self.synthetic:
                raise ConfigError(f"{prefix}.path must be a single folder when {prefix}.synthetic is true, got a list")
        else:
            raise ConfigError(f"{prefix}.path must be a folder (string) or a list of shard globs, got {self.path!r}")
        for key in ("synthetic", "shuffle"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{prefix}.{key} must be true or false, got {getattr(self, key)!r}")
        positive = ("synthetic_num_samples", "synthetic_samples_per_shard", "latent_channels", "latent_frames",
                    "latent_height", "latent_width", "text_len", "text_dim")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{prefix}.{key} must be a positive integer, got {value!r}")
        for key in ("num_workers", "synthetic_seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{prefix}.{key} must be a non-negative integer, got {value!r}")
        return self
