"""Typed configuration of the parallel layout (the `parallel:` section), free of torch so configs load fast.

The degrees multiply to the world size; osp_megatron.parallel.state builds the process groups from them.
"""

from dataclasses import dataclass
from typing import Optional

from osp_megatron.config.errors import ConfigError


@dataclass
class ParallelConfig:
    """Parallel degrees; their product must equal the world size (`data: null` derives it)."""

    tensor: int = 1
    data: Optional[int] = None
    ssp: int = 1
    ulysses: int = 1
    backend: Optional[str] = None  # null: nccl on CUDA, gloo on CPU
    timeout_minutes: int = 30

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("tensor", "ssp", "ulysses", "timeout_minutes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.data is not None and self.data < 1:
            raise ConfigError(f"{prefix}.data: must be >= 1 or null (derived from the world size), got {self.data}")
        if self.backend not in (None, "gloo", "nccl", "hccl"):
            raise ConfigError(f"{prefix}.backend: {self.backend!r} is not one of null, gloo, nccl, hccl")

    @property
    def context(self) -> int:
        return self.ssp * self.ulysses
