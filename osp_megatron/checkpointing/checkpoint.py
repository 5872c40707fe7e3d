"""Training checkpoints of a run: where they live, which one to resume, and saving and loading one.

A checkpoint is written into `step_XXXXXXXX.tmp` by every rank in parallel (torch.distributed.checkpoint
pieces with global shapes, per-rank state, a manifest of sizes and CRC-32s), then renamed and published
through `latest` by one atomic rename each; a crash at any moment leaves the previous checkpoint complete and
the unfinished one ignored. Loading reshards to the current layout and checks the files it reads.
"""

from pathlib import Path

import torch
import torch.distributed as dist

from osp_megatron.checkpointing.integrity import (
    CheckpointCorruptError,
    find_problems,
    mark_verified,
    read_manifest,
)
from osp_megatron.checkpointing.metadata import (  # noqa: F401  (re-exported for the trainer and tools)
    METADATA,
    current_layout,
    describe_layout,
    is_complete,
    read_metadata,
    same_layout,
    saved_layout,
)
from osp_megatron.config.errors import ConfigError


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp") and is_complete(p)
    ]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run (via `latest`, else by scanning), or None."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def weights_path(path: str | Path, key: str = "checkpoint.load") -> Path:
    """Weights named by a setting: a complete checkpoint as given, a run folder's newest checkpoint, or published
    weights (a diffusers folder, a Wan2.1 file) as given. `key` names the setting in errors."""
    weights = Path(path)
    if not weights.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist")
    if is_complete(weights) or not weights.is_dir():
        return weights
    newest = latest_checkpoint(weights)
    if newest is not None:
        return newest
    if (weights / "checkpoints").is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a run folder without a complete checkpoint")
    return weights


def checkpoint_writer(run_dir: str | Path, keep_last: int | None = None, asynchronous: bool = False):
    """The writer of a run's checkpoints (asynchronous: written in the background, one at a time)."""
    from osp_megatron.checkpointing.writer import CheckpointWriter

    return CheckpointWriter(
        checkpoint_dir(run_dir), keep_last, asynchronous, complete_checkpoints=lambda: list_checkpoints(run_dir)
    )


def checkpoint_metadata(step: int, fsdp: bool, metadata: dict | None = None) -> dict:
    """What metadata.json records besides the caller's entries: step and parallel layout."""
    info = dict(metadata or {})
    layout = current_layout(fsdp)
    info.update(step=step, layout=layout, tensor_parallel=layout["tensor"], world_size=layout["world_size"])
    return info


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer=None,
    ema=None,
    rank_state: dict | None = None,
    metadata: dict | None = None,
    keep_last: int | None = None,
    writer=None,
    parameters: list[str] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder (published on return unless `writer`
    writes asynchronously; then once writer.wait() returns). `parameters`: the weights stored (default all)."""
    from osp_megatron.checkpointing.distributed import training_tensors
    from osp_megatron.parallel.fsdp import is_fsdp_model

    writer = writer or checkpoint_writer(run_dir, keep_last)
    tensors = training_tensors(model, optimizer, ema, parameters=parameters)
    return writer.save(
        step_dir_name(step), tensors, rank_state or {}, checkpoint_metadata(step, is_fsdp_model(model), metadata)
    )


def load_model_weights(
    path: str | Path,
    model: torch.nn.Module,
    which: str = "model",
    strict: bool = True,
    names: dict[str, str] | None = None,
):
    """Load weights (or EMA weights with which='ema') into `model` under its own layout; returns (missing,
    unexpected) names. `names`: model parameter name -> stored name (default: all, unchanged)."""
    from osp_megatron.checkpointing.training_state import load_weights

    return load_weights(path, model, which, strict, names)


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer=None, ema=None, parameters: list[str] | None = None
) -> tuple[dict, dict]:
    """Restore everything a training step depends on, resharded to this run's layout; returns (metadata, the
    saved per-rank state: this rank's under the same layout, else rank 0's). `parameters` as in save_checkpoint."""
    from osp_megatron.checkpointing.training_state import load_training_state

    return load_training_state(path, model, optimizer, ema, parameters=parameters)


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


def resumable_checkpoint(run_dir: str | Path, say=print) -> Path | None:
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
            "with checkpoint.resume=none (or another run.dir), or repair the files"
        )
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


def resume_target(resume: str, run_dir: str | Path, fsdp: bool = False, say=print) -> Path | None:
    """Collective: the checkpoint a job continues from (checkpoint.resume: 'auto', 'none' or a path), checked
    for damage before any work; None for a fresh start. A checkpoint of another parallel layout is resharded
    as it loads: both layouts are named."""
    if resume == "none":
        return None
    path = resumable_checkpoint(run_dir, say=say) if resume == "auto" else verify_resume_path(resume)
    if path is None:
        return None
    saved, now = saved_layout(read_metadata(path)), current_layout(fsdp)
    if saved != now:
        # Every tensor is read back as the pieces this layout holds; the per-rank state (data position,
        # quantization scales) comes from rank 0.
        say(
            f"checkpoint {path} was saved with {describe_layout(saved)}; resharding it to this run's "
            f"{describe_layout(now)}"
        )
    return path
