"""Training state as torch.distributed.checkpoint (DCP) tensors with global shapes, readable under any layout.

Every tensor is stored as the pieces its ranks hold, each with its offset in the whole (tensor-parallel slices
and FSDP shards alike), so a run with other tensor / data / SSP / Ulysses sizes, FSDP on or off, reads back
exactly the pieces it holds.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from osp_megatron.checkpointing.integrity import CheckpointCorruptError
from osp_megatron.checkpointing.offline import stored_index
from osp_megatron.checkpointing.sharded import partition_dim
from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel import state
from osp_megatron.parallel.fsdp import fsdp_chunk, is_fully_sharded, local_tensor

# The kinds of tensors a training checkpoint holds; a stored key is "<kind>/<parameter name>", optimizer
# moments "optimizer/<moment>/<parameter name>".
MODEL, EMA, OPTIMIZER = "model", "ema", "optimizer"
OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class StoredTensor:
    """One tensor of the training state as this rank holds it.

    local: this rank's storage (written from, and read into, in place); shape: the whole tensor-parallel
    slice (what one tensor-parallel rank holds before FSDP shards it); partition_dim: the dimension tensor
    parallelism splits the full tensor along (None: every tensor-parallel rank holds all of it);
    fsdp_sharded: `local` is FSDP's dim-0 chunk of the slice over the data x context ranks (else a replica).
    """

    local: torch.Tensor
    shape: tuple
    partition_dim: int | None
    fsdp_sharded: bool


def stored_like(param: torch.Tensor, tensor: torch.Tensor) -> StoredTensor:
    """`tensor` (the parameter itself, or its EMA or an optimizer moment) stored as `param` is laid out."""
    return StoredTensor(local_tensor(tensor), tuple(param.shape), partition_dim(param), is_fully_sharded(param))


def training_tensors(
    model: torch.nn.Module,
    optimizer=None,
    ema=None,
    which: tuple = (MODEL, EMA, OPTIMIZER),
    create_optimizer_state: bool = False,
    parameters: list[str] | None = None,
) -> dict:
    """Keyed StoredTensors of the model weights, EMA and AdamW moments (plus the moments' step counts as plain
    tensors). `create_optimizer_state` allocates moments the optimizer has not created yet (to load into).
    `parameters`: the weights stored (default all; a LoRA model stores its adapters, not the frozen base)."""
    params = dict(model.named_parameters())
    tensors = {}
    if MODEL in which:
        stored = params if parameters is None else {name: params[name] for name in parameters}
        tensors.update({f"{MODEL}/{name}": stored_like(param, param) for name, param in stored.items()})
    if EMA in which and ema is not None:
        shadow = ema.state_tensors()
        tensors.update({f"{EMA}/{name}": stored_like(params[name], average) for name, average in shadow.items()})
    if OPTIMIZER in which and optimizer is not None:
        # Only the parameters the optimizer trains have moments (frozen ones, e.g. a base model under LoRA, none).
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, param in params.items():
            if id(param) not in trained:
                continue
            if create_optimizer_state and not optimizer.state.get(param):
                initialise_adam_state(optimizer, param)
            moments = optimizer.state.get(param) or {}
            for key in OPTIMIZER_MOMENTS:
                if key in moments:
                    tensors[f"{OPTIMIZER}/{key}/{name}"] = stored_like(param, moments[key])
            if "step" in moments:
                tensors[f"{OPTIMIZER}/step/{name}"] = moments["step"]
    return tensors


def initialise_adam_state(optimizer, param) -> None:
    """Zero moments and step count, as AdamW's first step creates them (to be overwritten by a load)."""
    state_ = optimizer.state[param]
    for key in OPTIMIZER_MOMENTS:
        state_[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    # Fused and capturable AdamW keep the step count on the parameter's device, the others on the CPU.
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    state_["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(param).device if on_device else "cpu")


def local_piece(tensor_parallel_slice: torch.Tensor, stored: StoredTensor) -> torch.Tensor:
    """The part of a whole tensor-parallel slice that `stored` holds: its FSDP shard or the whole slice."""
    return fsdp_chunk(tensor_parallel_slice) if stored.fsdp_sharded else tensor_parallel_slice


def full_shape(stored: StoredTensor, tensor_parallel: int) -> tuple:
    shape = list(stored.shape)
    if stored.partition_dim is not None:
        shape[stored.partition_dim] *= tensor_parallel
    return tuple(shape)


def tensor_by_data_context_mesh(device_type: str) -> DeviceMesh:
    """The 2-D mesh (tensor, data_context) over the world: row t holds the data x context ranks of tensor-parallel
    rank t, so a tensor split by TP along its partition dim, then by FSDP along dim 0 of each slice, is the
    DTensor (Shard(partition_dim), Shard(0)) on it (or Replicate() where a split is absent)."""
    tp = state.tensor_parallel_size()
    world = dist.get_world_size()
    # Order tp-cp-ep-dp-pp: global rank = tensor rank + TP x (data x context index).
    ranks = torch.arange(world, dtype=torch.int).reshape(world // tp, tp).T.contiguous()
    column = (ranks == dist.get_rank()).nonzero()[0, 1]
    tensor_group = sorted(dist.get_process_group_ranks(state.tensor_parallel_group()))
    if ranks[:, column].tolist() != tensor_group:
        raise RuntimeError(f"tensor-parallel group {tensor_group} does not follow rank order tp-cp-ep-dp-pp")
    return DeviceMesh.from_group(
        [state.tensor_parallel_group(), state.gradient_reduction_group()],
        device_type,
        mesh=ranks,
        mesh_dim_names=("tensor", "data_context"),
    )


def as_global(stored: StoredTensor, meshes: dict) -> DTensor:
    """A DTensor with the tensor's full shape whose local piece aliases `stored.local` (no copy; detached, so
    loads write into the parameter itself and the asynchronous stager may copy it)."""
    local = stored.local.detach()
    mesh = meshes.get(local.device.type)
    if mesh is None:
        mesh = meshes[local.device.type] = tensor_by_data_context_mesh(local.device.type)
    shape = full_shape(stored, mesh.size(0))
    placements = (
        Shard(stored.partition_dim) if stored.partition_dim is not None else Replicate(),
        Shard(0) if stored.fsdp_sharded else Replicate(),
    )
    return DTensor.from_local(
        local,
        mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def global_state_dict(tensors: dict) -> dict:
    meshes = {}
    return {
        key: as_global(value, meshes) if isinstance(value, StoredTensor) else value for key, value in tensors.items()
    }


def save_tensors(folder: Path, tensors: dict, process_group=None, asynchronous: bool = False):
    """Collective: every rank writes the pieces it holds (replicated pieces once, spread over the ranks
    holding them) into folder/__<rank>_0.distcp, rank 0 the index (.metadata). Returns a future for an
    asynchronous save, which copies the tensors to host memory before returning."""
    state_dict = global_state_dict(tensors)
    writer = FileSystemWriter(str(folder))
    if asynchronous:
        return dcp.async_save(state_dict, storage_writer=writer, process_group=process_group)
    dcp.save(state_dict, storage_writer=writer, process_group=process_group)
    return None


def check_compatible(folder: Path, tensors: dict, tensor_parallel: int) -> None:
    """Refuse, naming the tensors, when the checkpoint lacks some of `tensors` or stores other shapes."""
    index = stored_index(folder)
    missing = sorted(key for key in tensors if key not in index)
    if missing:
        raise ConfigError(
            f"checkpoint {str(folder.parent)!r} lacks {len(missing)} tensors this run needs: "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    for key, value in tensors.items():
        expected = full_shape(value, tensor_parallel) if isinstance(value, StoredTensor) else tuple(value.shape)
        if tuple(index[key].size) != expected:
            raise ConfigError(
                f"checkpoint {str(folder.parent)!r} stores {key!r} with shape {tuple(index[key].size)}; "
                f"this model holds {expected} (a different model configuration?)"
            )


def load_tensors(folder: Path, tensors: dict) -> None:
    """Collective: read every tensor's pieces this rank holds, in place, whatever layout wrote them."""
    check_compatible(folder, tensors, state.tensor_parallel_size())
    try:
        dcp.load(global_state_dict(tensors), storage_reader=FileSystemReader(str(folder)))
    except (Exception, CheckpointException) as exc:  # DCP wraps each rank's read failure (a BaseException)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointCorruptError(
            f"{folder}: its tensors cannot be read ({reason}); the checkpoint is "
            "damaged (osp-ckpt verify names the file)"
        ) from exc
