"""Typed configuration of the parallel layout (the `parallel:` section), free of torch so configs load fast.

The degrees multiply to the world size; osp_megatron.parallel.state builds the process groups from them.
"""

from dataclasses import dataclass
from typing import Literal

from osp_megatron.config.errors import ConfigError


@dataclass
class ParallelConfig:
    """Parallel degrees; their product must equal the world size (`data: null` derives it)."""

    tensor: int = 1
    data: int | None = None
    ssp: int = 1
    ulysses: int = 1
    backend: str | None = None  # null: nccl on CUDA, gloo on CPU
    timeout_minutes: float = 30  # how long a collective waits for a missing rank; fractions for tests (0.5)
    # FSDP2: shard weights, gradients, optimizer state and EMA over the data x SSP x Ulysses ranks of each
    # tensor-parallel rank (docs/sharding.md); offload keeps those shards in CPU memory.
    fsdp: bool = False
    fsdp_offload: bool = False
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the gradient reduce-scatter

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("tensor", "ssp", "ulysses"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.timeout_minutes <= 0:
            raise ConfigError(f"{prefix}.timeout_minutes: must be > 0, got {self.timeout_minutes}")
        if self.data is not None and self.data < 1:
            raise ConfigError(f"{prefix}.data: must be >= 1 or null (derived from the world size), got {self.data}")
        if self.backend not in (None, "gloo", "nccl", "hccl"):
            raise ConfigError(f"{prefix}.backend: {self.backend!r} is not one of null, gloo, nccl, hccl")
        if self.fsdp_offload and not self.fsdp:
            raise ConfigError(f"{prefix}.fsdp_offload offloads FSDP's shards; it needs {prefix}.fsdp=true")

    @property
    def context(self) -> int:
        return self.ssp * self.ulysses
