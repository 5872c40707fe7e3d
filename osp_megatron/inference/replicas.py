"""How sampling ranks share the work: model replicas render different videos, CFG pairs split guidance.

Built over megatron's layout (tensor, SSP x Ulysses, data): with CFG parallelism, data-parallel ranks 2k and 2k+1
of every (tensor, context) position form a pair, so a replica is tensor x context x 2 ranks.
"""

from dataclasses import dataclass

import torch.distributed as dist

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel import state


@dataclass(frozen=True)
class SamplingLayout:
    """This rank's share of a sampling run.

    replicas: model replicas rendering different videos (each runs one video at a time on all its ranks);
    replica: this rank's replica; cfg_group: its two-rank CFG group (None without CFG parallelism);
    writer: whether this rank decodes and writes its replica's videos (one rank per replica).
    """

    replicas: int = 1
    replica: int = 0
    cfg_group: object | None = None
    cfg_rank: int = 0
    writer: bool = True


def build_sampling_layout(cfg_parallel: bool) -> SamplingLayout:
    """The layout of this rank after init_distributed (collective: every rank calls it)."""
    data, data_rank = state.data_parallel_size(), state.data_parallel_rank()
    model_leader = state.tensor_parallel_rank() == 0 and state.sequence_parallel_groups().context_rank == 0
    if not cfg_parallel:
        return SamplingLayout(replicas=data, replica=data_rank, writer=model_leader)
    if data % 2:
        raise ConfigError(
            f"sample.cfg_parallel needs an even number of data-parallel ranks to pair, got {data} (world size "
            f"{dist.get_world_size()} / (parallel.tensor x parallel.ssp x parallel.ulysses)); use an even world "
            "size per model replica or turn CFG parallelism off"
        )
    # Every rank learns every rank's (position in the model, data-parallel index), then all build all pairs.
    position = (state.tensor_parallel_rank(), state.sequence_parallel_groups().context_rank)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (dist.get_rank(), position, data_rank))
    pairs = []
    for where in sorted({pos for _, pos, _ in everyone}):
        column = sorted((d, rank) for rank, pos, d in everyone if pos == where)
        pairs += [[column[d][1], column[d + 1][1]] for d in range(0, len(column), 2)]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    cfg_rank = data_rank % 2
    return SamplingLayout(
        replicas=data // 2,
        replica=data_rank // 2,
        cfg_group=group,
        cfg_rank=cfg_rank,
        writer=model_leader and cfg_rank == 0,
    )
