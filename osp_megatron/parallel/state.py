"""Process groups: torch.distributed start-up from torchrun or Slurm, megatron-core parallel_state layout.

Tensor, data and context (SSP x Ulysses) groups live in megatron.core.parallel_state; SSP and Ulysses split CP.
"""

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel.config import ParallelConfig  # noqa: F401  (the config lives apart from torch)
from osp_megatron.parallel.diagnostics import apply_communication_defaults, install_collective_failure_report
from osp_megatron.parallel.rendezvous import launcher_environment


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class WorldSplit:
    """A world whose last `reserved` ranks serve the first ones (e.g. reward models): each part has a default
    group of its own, and `bridge`, a gloo group over the whole world, carries tensors between the parts."""

    world_rank: int
    world_size: int
    reserved: int
    bridge: object

    @property
    def served_size(self) -> int:
        return self.world_size - self.reserved

    @property
    def is_reserved(self) -> bool:
        return self.world_rank >= self.served_size


_WORLD_SPLIT = None


def world_split():
    """The WorldSplit of this job, or None when the default group is the whole world."""
    return _WORLD_SPLIT


def _init_split_world(backend: str, rank: int, world: int, reserved: int, timeout: datetime.timedelta, device):
    """Default group over the first world - reserved ranks (or over the reserved ones), plus the bridge."""
    global _WORLD_SPLIT
    # torch's own env:// rendezvous (it joins torchrun's agent store), shared by the three groups through prefixes.
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    served = world - reserved
    part, part_rank, part_size = ("served", rank, served) if rank < served else ("reserved", rank - served, reserved)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"{part}/", store),
        rank=part_rank,
        world_size=part_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    bridge = dist.ProcessGroupGloo(dist.PrefixStore("bridge/", store), rank, world, timeout)
    _WORLD_SPLIT = WorldSplit(rank, world, reserved, bridge)


def init_distributed(
    config: ParallelConfig, reserved_ranks: int = 0, reserved_key: str = "grpo.reward_ranks"
) -> torch.device:
    """Start torch.distributed (if needed), megatron-core's groups and the SSP / Ulysses groups.

    reserved_ranks > 0 keeps the last ranks of the world out of the layout (see WorldSplit): the layout is
    computed over the first world - reserved_ranks, and the reserved ranks get no model-parallel groups.

    Rank order (innermost first): tensor, Ulysses, SSP, data. Megatron's order tp-cp-ep-dp-pp makes tensor
    ranks adjacent, then the context-parallel group of S x U ranks; inside it context rank c = s * U + u,
    so the U Ulysses ranks (all-to-alls in every layer) are adjacent and the S SSP ranks (one all-to-all per
    pattern switch, a quarter of a Ulysses layer's bytes) stride U. With tensor x ssp x ulysses <= 8 a whole
    model replica, and so every all-to-all, stays inside one NVLink node; data parallel spans nodes.
    """
    rank, world, local_rank = launcher_environment()
    if reserved_ranks and not 0 < reserved_ranks < world:
        raise ConfigError(
            f"{reserved_key}={reserved_ranks} must leave ranks for the model: it must be smaller than "
            f"the world size {world} (launch more ranks, or set {reserved_key}=0)"
        )
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = config.backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        # Read by the process group when it is built: NCCL settings, async error handling, flight recorder.
        apply_communication_defaults()
        install_collective_failure_report()
        if reserved_ranks:
            _init_split_world(
                backend, rank, world, reserved_ranks, datetime.timedelta(minutes=config.timeout_minutes), device
            )
        else:
            if world == 1 and "MASTER_ADDR" not in os.environ:
                init_method = f"tcp://127.0.0.1:{_free_port()}"
            else:
                init_method = "env://"
            dist.init_process_group(
                backend,
                init_method=init_method,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(minutes=config.timeout_minutes),
                # Binds the group to this rank's GPU (NCCL communicators start eagerly; no device-guessing warning).
                device_id=device if backend == "nccl" else None,
            )
    if _WORLD_SPLIT is not None and _WORLD_SPLIT.is_reserved:
        return device
    world = dist.get_world_size()
    check_layout(config, world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tensor,
            context_parallel_size=config.context,
            distributed_timeout_minutes=config.timeout_minutes,
            order="tp-cp-ep-dp-pp",
        )
        _build_sequence_parallel_groups(config.ssp, config.ulysses, config.timeout_minutes)
    return device


@dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's sequence-parallel groups; a group of one rank is None (nothing to communicate).

    context: all S x U ranks (megatron's CP group; full layers run Ulysses over it, the output is gathered
    over it); ssp: the S ranks with this rank's Ulysses index (pattern switches); ulysses: the U ranks with
    this rank's SSP index (Ulysses inside each subsequence).
    """

    ssp_size: int = 1
    ulysses_size: int = 1
    ssp_rank: int = 0
    ulysses_rank: int = 0
    context: object = None
    ssp: object = None
    ulysses: object = None

    @property
    def context_size(self) -> int:
        return self.ssp_size * self.ulysses_size

    @property
    def context_rank(self) -> int:
        return self.ssp_rank * self.ulysses_size + self.ulysses_rank


_SEQUENCE_GROUPS = SequenceParallelGroups()


def context_parallel_groups_of_world(tensor: int, context: int, world: int) -> list[list[int]]:
    """Global ranks of every context-parallel group, each in context-rank order, for order tp-cp-ep-dp-pp."""
    return [
        [t + tensor * c + tensor * context * rest for c in range(context)]
        for rest in range(world // (tensor * context))
        for t in range(tensor)
    ]


def _build_sequence_parallel_groups(ssp: int, ulysses: int, timeout_minutes: int) -> None:
    """Split every context-parallel group into SSP and Ulysses groups (collective: all ranks create all)."""
    global _SEQUENCE_GROUPS
    context = ssp * ulysses
    if context == 1:
        _SEQUENCE_GROUPS = SequenceParallelGroups()
        return
    mine = list(parallel_state.get_context_parallel_global_ranks())
    all_groups = context_parallel_groups_of_world(
        parallel_state.get_tensor_model_parallel_world_size(), context, dist.get_world_size()
    )
    if mine not in all_groups:
        raise RuntimeError(f"megatron-core's context-parallel group {mine} does not follow order tp-cp-ep-dp-pp")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    context_group = parallel_state.get_context_parallel_group()
    ssp_group = ulysses_group = None
    for ranks in all_groups:
        # Groups spanning the whole context group reuse megatron's communicator instead of opening another.
        for u in range(ulysses):
            members = [ranks[s * ulysses + u] for s in range(ssp)]
            if 1 < ssp < context:
                group = dist.new_group(members, timeout=timeout)
            else:
                group = context_group if ssp == context else None
            if ranks == mine and dist.get_rank() in members:
                ssp_group = group
        for s in range(ssp):
            members = [ranks[s * ulysses + u] for u in range(ulysses)]
            if 1 < ulysses < context:
                group = dist.new_group(members, timeout=timeout)
            else:
                group = context_group if ulysses == context else None
            if ranks == mine and dist.get_rank() in members:
                ulysses_group = group
    context_rank = mine.index(dist.get_rank())
    _SEQUENCE_GROUPS = SequenceParallelGroups(
        ssp_size=ssp,
        ulysses_size=ulysses,
        ssp_rank=context_rank // ulysses,
        ulysses_rank=context_rank % ulysses,
        context=context_group,
        ssp=ssp_group,
        ulysses=ulysses_group,
    )


def sequence_parallel_groups() -> SequenceParallelGroups:
    return _SEQUENCE_GROUPS


def ssp_group():
    return _SEQUENCE_GROUPS.ssp


def ssp_size() -> int:
    return _SEQUENCE_GROUPS.ssp_size


def ssp_rank() -> int:
    return _SEQUENCE_GROUPS.ssp_rank


def ulysses_group():
    return _SEQUENCE_GROUPS.ulysses


def ulysses_size() -> int:
    return _SEQUENCE_GROUPS.ulysses_size


def ulysses_rank() -> int:
    return _SEQUENCE_GROUPS.ulysses_rank


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


def destroy_model_parallel() -> None:
    """Forget megatron's and the sequence-parallel groups but keep torch.distributed (to change layout)."""
    global _SEQUENCE_GROUPS
    _SEQUENCE_GROUPS = SequenceParallelGroups()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def destroy_distributed() -> None:
    global _WORLD_SPLIT
    _WORLD_SPLIT = None
    destroy_model_parallel()
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


def communication_device() -> torch.device:
    """Where tensors handed to collectives must live: the current accelerator under NCCL / HCCL, else the CPU."""
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def is_logging_rank() -> bool:
    if _WORLD_SPLIT is not None and _WORLD_SPLIT.is_reserved:
        return False
    return not dist.is_initialized() or dist.get_rank() == 0


def ensure_single_rank_group() -> torch.device:
    """Set up a one-rank group when none exists (plain Python processes, notebooks, tools)."""
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return init_distributed(ParallelConfig())


def amax_reduction_group():
    """Ranks that must agree on quantisation scales: those sharing one model replica (tensor x context)."""
    return parallel_state.get_tensor_and_context_parallel_group()
