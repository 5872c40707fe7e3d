"""Where a GRPO policy starts: checkpoint.load resolved (pretrained first when asked), and checked to have been
trained with the encoders the rollouts use.

The policy model itself is built by the engine (engine/model.py), like every job's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from osp_megatron.checkpointing.checkpoint import latest_checkpoint, weights_path
from osp_megatron.checkpointing.metadata import is_complete, read_metadata
from osp_megatron.config.errors import ConfigError

# Launcher variables a child osp-train must not inherit: it is a one-rank job of its own.
_LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


def _saved_setting(saved: dict, dotted: str, default):
    section, key = dotted.split(".")
    return (saved.get(section) or {}).get(key, default)


def _setting(config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def check_encoders_match(config, weights: Path) -> None:
    """The rollout VAE and text encoder must be the ones the policy was trained with: decoding its latents with
    another VAE (or conditioning on another encoder's states) scores videos it never learned to make.

    Built-in encoders are compared by name (model.vae) and seed (data.synthetic_seed); a local folder only by
    being set or not (folders move between machines). Published weights record no encoders and pass.
    """
    if not is_complete(weights):
        return
    metadata = read_metadata(weights)
    saved = metadata.get("config") or {"model": metadata.get("model_config") or {}}
    problems = []
    for path_key, builtin_key, default in (
        ("model.vae_path", "model.vae", "tiny-random"),
        ("model.text_encoder_path", "data.synthetic_seed", 0),
    ):
        ours, theirs = _setting(config, path_key), _saved_setting(saved, path_key, None)
        if (ours is None) != (theirs is None):
            problems.append((path_key, ours, theirs))
        elif ours is None and _setting(config, builtin_key) != _saved_setting(saved, builtin_key, default):
            problems.append((builtin_key, _setting(config, builtin_key), _saved_setting(saved, builtin_key, default)))
    # Parameter-free architecture: weights load either way, but the DiT would see other inputs than it learned.
    key = "model.absolute_positions"
    ours, theirs = _setting(config, key), _saved_setting(saved, key, False)
    if ours != theirs:
        problems.append((key, ours, theirs))
    if problems:
        dotted, ours, theirs = problems[0]
        ours, theirs = _as_written(ours), _as_written(theirs)
        raise ConfigError(
            f"{dotted}={ours} but the policy in checkpoint.load={str(weights)!r} was trained with "
            f"{dotted}={theirs}; set {dotted}={theirs} so that rollouts are made like its "
            "training data"
        )


def _as_written(value) -> str:
    """A setting as one writes it in a config override: true, false, null, 3, 'tiny-block'."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def run_pretraining(config_name: str, run_dir: str) -> None:
    """Run `osp-train` with `config_name` ("tiny": the packaged tiny config) into `run_dir`, as a subprocess."""
    from osp_megatron.engine.cli import packaged_config

    config_path = str(packaged_config("tiny_t2v.yaml")) if config_name == "tiny" else config_name
    command = [sys.executable, "-m", "osp_megatron.training.cli", "--config", config_path, f"run.dir={run_dir}"]
    print(
        f"[osp-grpo] checkpoint.load={run_dir!r} holds no checkpoint yet (grpo.pretrain_if_missing={config_name!r}): "
        f"pretraining it first with `osp-train --config {config_path} run.dir={run_dir}`; GRPO starts when it "
        "ends",
        flush=True,
    )
    environment = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    result = subprocess.run(command, env=environment)
    if result.returncode != 0:
        raise ConfigError(f"the pretraining for checkpoint.load={run_dir!r} failed (exit status {result.returncode})")


def _needs_pretraining(path: Path) -> bool:
    """True when checkpoint.load names nothing to load yet: no such path, or a folder that holds no complete
    checkpoint and no published weights (an empty run folder, one whose pretraining stopped before its first
    save, or one holding only another run's data)."""
    if not path.exists():
        return True
    if not path.is_dir() or is_complete(path):
        return False
    if (path / "checkpoints").is_dir() and latest_checkpoint(path) is not None:
        return False
    weight_suffixes = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
    return not any(p.suffix in weight_suffixes for p in path.rglob("*") if "checkpoints" not in p.parts)


def initial_policy_weights(config) -> Path | None:
    """checkpoint.load resolved to the weights to start from, pretraining them first when
    grpo.pretrain_if_missing says so and there is nothing there yet; None without checkpoint.load."""
    load = config.checkpoint.load
    if load is None:
        return None
    if _needs_pretraining(Path(load)):
        recipe = config.grpo.pretrain_if_missing
        if recipe is None:
            what = "does not exist" if not Path(load).exists() else "holds no checkpoint or weight file"
            raise ConfigError(
                f"checkpoint.load={load!r} {what}; point it at a pretraining run or checkpoint, or "
                "set grpo.pretrain_if_missing=tiny to create it"
            )
        if dist.get_rank() == 0:
            run_pretraining(recipe, load)
        dist.barrier()
    return weights_path(load)
