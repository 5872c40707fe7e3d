"""Crash-safe training checkpoints: sharded weights, EMA and optimizer moments, per-rank RNG and data state.

A checkpoint is written into `step_XXXXXXXX.tmp`, then renamed and published through `latest` by one atomic
rename each; a crash at any moment leaves the previous checkpoint complete and the unfinished one ignored.
Every file's size and CRC-32 go into its manifest; loads check the files they read against it.
"""

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from osp_megatron.checkpointing.integrity import (
    CheckpointCorruptError,
    digest_files,
    find_problems,
    mark_verified,
    read_manifest,
    verify_file,
    write_manifest,
)
from osp_megatron.checkpointing.metadata import FORMAT, METADATA, is_complete, read_metadata  # noqa: F401
from osp_megatron.checkpointing.sharded import load_shard_into, partition_dim, save_shard
from osp_megatron.config.errors import ConfigError


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _ranks():
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    replica = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return tp_rank, tp_size, replica


def named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def save_model_shard(directory: Path, tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> Path:
    tp_rank, tp_size, _ = _ranks()
    partition = {name: partition_dim(params[name.split("/", 1)[-1]]) for name in tensors}
    return save_shard(directory, tensors, partition, tp_rank, tp_size)


def current_layout() -> dict:
    """The parallel degrees of this run, as recorded in checkpoints and compared on resume."""
    from osp_megatron.parallel import state

    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"world_size": world, "tensor": state.tensor_parallel_size(), "data": state.data_parallel_size(),
            "ssp": state.ssp_size(), "ulysses": state.ulysses_size()}


def saved_layout(metadata: dict) -> dict:
    """The layout a checkpoint was written under (checkpoints from before layouts were recorded: inferred)."""
    if "layout" in metadata:
        return dict(metadata["layout"])
    world, tensor = int(metadata.get("world_size", 1)), int(metadata.get("tensor_parallel", 1))
    return {"world_size": world, "tensor": tensor, "data": world // tensor, "ssp": 1, "ulysses": 1}


def describe_layout(layout: dict) -> str:
    return (f"tensor={layout['tensor']} data={layout['data']} ssp={layout['ssp']} ulysses={layout['ulysses']} "
            f"(world size {layout['world_size']})")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
             and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """Newest complete checkpoint of a run (via `latest`, else by scanning), or None."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, ema=None,
                    rank_state: Optional[dict] = None, metadata: Optional[dict] = None,
                    keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint folder."""
    root = checkpoint_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    global_rank = dist.get_rank() if dist.is_initialized() else 0
    if global_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    tp_rank, tp_size, replica = _ranks()
    params = named_parameters(model)
    written = []
    if replica == 0:
        written.append(save_model_shard(tmp / "model", {n: p.data for n, p in params.items()}, params))
        if ema is not None:
            written.append(save_model_shard(tmp / "ema", ema.state_tensors(), params))
        if optimizer is not None:
            moments, scalars = optimizer_moments(optimizer, params)
            written.append(save_model_shard(tmp / "optimizer", moments, params))
            if tp_rank == 0:
                _write_atomic(tmp / "optimizer" / "scalars.json", json.dumps(scalars))
                written.append(tmp / "optimizer" / "scalars.json")
    (tmp / "ranks").mkdir(exist_ok=True)
    rank_file = tmp / "ranks" / f"rank{global_rank:05d}.pt"
    with open(rank_file, "wb") as handle:
        torch.save(rank_state or {}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    written.append(rank_file)
    # Every rank checksums what it wrote (in parallel); rank 0 writes the manifest, then the metadata last.
    digests = digest_files(tmp, [str(path.relative_to(tmp)) for path in written])
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [digests]
    if dist.is_initialized():
        dist.all_gather_object(gathered, digests)

    if global_rank == 0:
        write_manifest(tmp, {name: digest for part in gathered for name, digest in part.items()})
        info = dict(metadata or {})
        info.update(format=FORMAT, step=step, tensor_parallel=tp_size, saved_at=time.time(),
                    world_size=dist.get_world_size() if dist.is_initialized() else 1, layout=current_layout())
        _write_atomic(tmp / METADATA, json.dumps(info, indent=2, default=str))
        if final.exists():
            stale = root / (final.name + ".old")
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", final.name)
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def optimizer_moments(optimizer, params: dict[str, torch.nn.Parameter]):
    """AdamW state as named tensors ('exp_avg/<param>') plus per-parameter scalar step counts."""
    names = {id(p): n for n, p in params.items()}
    moments, scalars = {}, {}
    for param, state in optimizer.state.items():
        name = names[id(param)]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                moments[f"{key}/{name}"] = value
            else:
                scalars[f"{key}/{name}"] = float(value)
    return moments, scalars


def load_model_weights(path: str | Path, model: torch.nn.Module, which: str = "model", strict: bool = True):
    """Load weights (or EMA weights with which='ema') into `model` at its own tensor-parallel size."""
    tp_rank, tp_size, _ = _ranks()
    folder = Path(path) / which
    if not folder.is_dir():
        raise ConfigError(f"checkpoint {str(path)!r} has no {which!r} weights folder")
    return load_shard_into(folder, named_parameters(model), tp_rank, tp_size, strict=strict, what=which)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, ema=None) -> tuple[dict, dict]:
    """Restore everything a training step depends on; returns (metadata, this rank's saved state)."""
    path = Path(path)
    metadata = read_metadata(path)
    tp_rank, tp_size, _ = _ranks()
    params = named_parameters(model)
    load_model_weights(path, model)
    if ema is not None and (path / "ema").is_dir():
        load_shard_into(path / "ema", ema.state_tensors(), tp_rank, tp_size, what="ema")
    if optimizer is not None and (path / "optimizer").is_dir():
        _load_optimizer(path / "optimizer", optimizer, params, tp_rank, tp_size)
    global_rank = dist.get_rank() if dist.is_initialized() else 0
    rank_file = path / "ranks" / f"rank{global_rank:05d}.pt"
    rank_state = {}
    if rank_file.exists():
        verify_file(rank_file)
        try:
            rank_state = torch.load(rank_file, weights_only=False)
        except Exception as exc:  # pickle and zip errors of a damaged file
            raise CheckpointCorruptError(f"{rank_file}: cannot be read ({exc})") from exc
    return metadata, rank_state


def _load_optimizer(folder: Path, optimizer, params, tp_rank, tp_size):
    verify_file(folder / "scalars.json")
    scalars = json.loads((folder / "scalars.json").read_text())
    targets = {}
    for name, param in params.items():
        if f"step/{name}" not in scalars:
            continue
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
            targets[f"{key}/{name}"] = state[key]
        # Fused and capturable Adam keep the step count on the parameter's device, the others on the CPU.
        on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
        state["step"] = torch.tensor(scalars[f"step/{name}"], dtype=torch.float32,
                                     device=param.device if on_device else "cpu")
    load_shard_into(folder, targets, tp_rank, tp_size, what="optimizer")


def checkpoint_problems(path: str | Path) -> list[str]:
    """Collective: what is damaged in a checkpoint, each rank checking a share of its files ([] if intact)."""
    path = Path(path)
    manifest = read_manifest(path) if (path / "manifest.json").exists() else None
    names = sorted((manifest or {"files": {}})["files"])
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = find_problems(path, names[rank::world]) if names else []
    if not path.joinpath(METADATA).is_file():
        mine.append(f"{METADATA}: missing")
    problems = [mine]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, mine)
    found = sorted({problem for part in problems for problem in part})
    if not found:
        mark_verified(path)
    return found


def resumable_checkpoint(run_dir: str | Path, say=print) -> Optional[Path]:
    """Collective: the newest intact checkpoint of a run, skipping damaged newer ones with a warning.

    None when the run has no checkpoint; an error naming every damaged one when none is intact.
    """
    damaged = []
    for candidate in reversed(list_checkpoints(run_dir)):
        problems = checkpoint_problems(candidate)
        if not problems:
            return candidate
        damaged.append(f"{candidate.name} ({'; '.join(problems)})")
        say(f"warning: checkpoint {candidate} is damaged ({'; '.join(problems)}); skipping it")
    if damaged:
        raise CheckpointCorruptError(
            f"every checkpoint of {str(checkpoint_dir(run_dir))!r} is damaged: {', '.join(damaged)}; start fresh "
            "with checkpoint.resume=none (or another run.dir), or repair the files")
    return None


def verify_resume_path(path: str | Path) -> Path:
    """Collective: an explicitly named checkpoint must be complete and intact; the error names what is not."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume={str(path)!r}: no such checkpoint folder")
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointCorruptError(f"checkpoint.resume={str(path)!r} is damaged: {'; '.join(problems)}")
    return path


def resume_target(resume: str, run_dir: str | Path, say=print) -> Optional[Path]:
    """Collective: the checkpoint a job continues from (checkpoint.resume: 'auto', 'none' or a path), checked
    for damage and for this run's parallel layout before any work; None for a fresh start."""
    if resume == "none":
        return None
    path = resumable_checkpoint(run_dir, say=say) if resume == "auto" else verify_resume_path(resume)
    if path is None:
        return None
    saved, now = saved_layout(read_metadata(path)), current_layout()
    if saved != now:
        raise ConfigError(
            f"checkpoint {path} was saved with parallel layout {describe_layout(saved)} but this run has "
            f"{describe_layout(now)}; resume it with the layout it was saved with, or start a new run.dir "
            f"that loads its weights only (checkpoint.load={path} checkpoint.resume=none)")
    return path
