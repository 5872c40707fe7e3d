"""Process groups: torch.distributed start-up from torchrun or Slurm, megatron-core parallel_state layout.

Tensor, data and context (SSP x Ulysses) parallel groups all live in megatron.core.parallel_state.
"""

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Slurm's variables; (0, 1, 0) when neither is set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        if world > 1 and "MASTER_ADDR" not in os.environ:
            raise ConfigError(
                "running under Slurm with several tasks but MASTER_ADDR is not set; launch through "
                "launch/slurm.sh, which exports MASTER_ADDR and MASTER_PORT from the first node"
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        return rank, world, int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(config: ParallelConfig) -> torch.device:
    """Start torch.distributed (if needed) and megatron-core's groups; return this rank's device.

    Megatron's rank order is tp-cp-ep-dp-pp: tensor-parallel ranks are adjacent (inside one node), then the
    context-parallel ranks (SSP x Ulysses, all-to-all heavy, next to stay in NVLink), then data parallel.
    """
    rank, world, local_rank = _launcher_environment()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = config.backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            init_method = "env://"
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=config.timeout_minutes),
        )
    world = dist.get_world_size()
    check_layout(config, world)
    if config.ssp > 1 or config.ulysses > 1:
        raise ConfigError(
            f"parallel.ssp={config.ssp}, parallel.ulysses={config.ulysses}: sequence parallelism is not built "
            "yet; use parallel.ssp=1 parallel.ulysses=1"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tensor,
            context_parallel_size=config.context,
            distributed_timeout_minutes=config.timeout_minutes,
            order="tp-cp-ep-dp-pp",
        )
    return device


def check_layout(config: ParallelConfig, world: int) -> None:
    """Refuse a parallel layout that does not multiply to the world size, saying what would."""
    model_parallel = config.tensor * config.context
    if world % model_parallel != 0:
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tensor x parallel.ssp x parallel.ulysses = "
            f"{config.tensor} x {config.ssp} x {config.ulysses} = {model_parallel}"
        )
    data = world // model_parallel
    if config.data is not None and config.data != data:
        raise ConfigError(
            f"parallel.data = {config.data} but world size {world} / (tensor {config.tensor} x ssp {config.ssp} "
            f"x ulysses {config.ulysses}) = {data}; set parallel.data={data} or null"
        )


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tensor_parallel_group():
    return parallel_state.get_tensor_model_parallel_group()


def tensor_parallel_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tensor_parallel_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def data_parallel_group():
    """Ranks that hold different samples and average gradients (megatron's DP group without CP)."""
    return parallel_state.get_data_parallel_group()


def data_parallel_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def gradient_reduction_group():
    """Ranks whose gradients of replicated parameters are summed: data parallel x context parallel."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def context_parallel_group():
    return parallel_state.get_context_parallel_group()


def context_parallel_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def ensure_single_rank_group() -> torch.device:
    """Set up a one-rank group when none exists (plain Python processes, notebooks, tools)."""
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return init_distributed(ParallelConfig())


def amax_reduction_group():
    """Ranks that must agree on quantisation scales: those sharing one model replica (tensor x context)."""
    return parallel_state.get_tensor_and_context_parallel_group()
