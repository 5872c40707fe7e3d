"""Fully sharded data parallelism (PyTorch FSDP2) applied to the DiT from outside, composed with megatron TP.

Each tensor-parallel rank shards its own slices over the data x SSP x Ulysses ranks that hold replicas of them.
"""

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel import state

REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Attributes megatron-core's tensor-parallel layers set on their parameters. FSDP replaces every parameter by
# a new DTensor parameter, so they are copied over: checkpoints and the gradient norm read them.
TENSOR_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's storage of a tensor: the local shard of an FSDP DTensor, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def fsdp_chunk(tensor_parallel_slice: torch.Tensor) -> torch.Tensor:
    """This rank's FSDP shard of a whole tensor-parallel slice: torch.chunk's dim-0 split over the data x
    context ranks (as fully_shard cuts it), empty past the last chunk."""
    group = state.gradient_reduction_group()
    chunks = torch.chunk(tensor_parallel_slice, torch.distributed.get_world_size(group), dim=0)
    rank = torch.distributed.get_rank(group)
    return chunks[rank] if rank < len(chunks) else tensor_parallel_slice.narrow(0, 0, 0)


@torch.no_grad()
def copy_slice_into(param: torch.Tensor, tensor_parallel_slice: torch.Tensor) -> None:
    """Write a whole tensor-parallel slice into `param`, of which this rank may hold an FSDP shard only."""
    if isinstance(param, DTensor):
        local = param.to_local()
        local.copy_(fsdp_chunk(tensor_parallel_slice).to(local.device, local.dtype))
    else:
        param.copy_(tensor_parallel_slice.to(param.device, param.dtype))


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters FSDP keeps after a forward without backward (the root keeps them by
    default), so that the parameters are the local shards again; a no-op for models without FSDP."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_fully_sharded(tensor: torch.Tensor) -> bool:
    """True for FSDP's sharded parameters (and optimizer states or gradients shaped like them)."""
    return isinstance(tensor, DTensor)


def data_context_mesh(device_type: str) -> DeviceMesh:
    """1-D mesh over the ranks holding replicas of this rank's tensor-parallel slice: data x SSP x Ulysses.

    Built on megatron-core's data-with-context group, whose gradients the replicated path averages: FSDP's
    reduce-scatter over it divides by its size, which is that average (see optim.average_gradients for why
    the context ranks are included).
    """
    return DeviceMesh.from_group(state.gradient_reduction_group(), device_type)


def _tensor_parallel_marks(model: torch.nn.Module) -> dict[str, dict]:
    return {
        name: {key: getattr(param, key) for key in TENSOR_PARALLEL_ATTRIBUTES if hasattr(param, key)}
        for name, param in model.named_parameters()
    }


def apply_fsdp(
    model: torch.nn.Module,
    reduce_dtype: str = "float32",
    compute_dtype: torch.dtype | None = None,
    offload: bool = False,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """Shard `model` (a WanDiT) with fully_shard per block plus the root; returns it (changed in place).

    compute_dtype: the dtype blocks all-gather and compute in (bfloat16 under bf16 training), from the float32
    sharded master weights; None computes in the stored dtype. The root's own parameters (embedders, output
    head: about 1 % of the weights) stay in float32, as the timestep embedding needs. reduce_dtype: dtype of
    the gradient reduce-scatter. offload: keep sharded parameters, gradients and optimizer state in CPU memory
    (FSDP2's CPUOffloadPolicy); the optimizer step then runs on the CPU.

    Every block but the last frees its gathered weights after forward and gathers them again for backward (the
    last one's backward comes first); each block prefetches the next block's weights in forward and the
    previous one's in backward, and each block's gradients are reduce-scattered as soon as its backward is
    done, overlapping the rest of the backward.
    """
    if reduce_dtype not in REDUCE_DTYPES:
        raise ConfigError(f"parallel.fsdp_reduce_dtype: {reduce_dtype!r} is not one of {', '.join(REDUCE_DTYPES)}")
    blocks = list(getattr(model, "blocks", []))
    if not blocks:
        raise ConfigError("parallel.fsdp: the model has no `blocks` to shard one by one")
    device = device or next(model.parameters()).device
    if offload and device.type == "cpu" and torch.cuda.is_available():
        raise ConfigError("parallel.fsdp_offload keeps weights on the CPU for a GPU job; train.device is cpu here")
    marks = _tensor_parallel_marks(model)
    mesh = data_context_mesh(device.type)
    offload_policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    # Inputs are left as they come: autocast picks GEMM dtypes, and RoPE tables and timesteps keep float32.
    block_policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=REDUCE_DTYPES[reduce_dtype], cast_forward_inputs=False
    )
    root_policy = MixedPrecisionPolicy(
        param_dtype=None, reduce_dtype=REDUCE_DTYPES[reduce_dtype], cast_forward_inputs=False
    )
    for index, block in enumerate(blocks):
        fully_shard(
            block,
            mesh=mesh,
            reshard_after_forward=index < len(blocks) - 1,
            mp_policy=block_policy,
            offload_policy=offload_policy,
        )
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=root_policy, offload_policy=offload_policy)
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([current])
    for name, param in model.named_parameters():
        for key, value in marks[name].items():
            setattr(param, key, value)
    return model


def is_fsdp_model(model: torch.nn.Module) -> bool:
    return any(isinstance(param, DTensor) for param in model.parameters())
