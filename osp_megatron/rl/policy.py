"""The GRPO policy in one place: the pretraining job's DiT, its initial weights, LoRA or full fine-tuning,
the frozen reference, the optimizer, and checkpoint save / load / export.

Sharded training (parallel.fsdp) changes only this module: wrapping, optimizer and checkpoint calls.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from osp_megatron.checkpointing.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from osp_megatron.checkpointing.metadata import is_complete, read_metadata
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import to_dict
from osp_megatron.models.builder import build_model
from osp_megatron.rl.lora import adapters_disabled, apply_lora, merge_lora
from osp_megatron.training.optim import EMA, build_optimizer

# Launcher variables a child osp-train must not inherit: it is a one-rank job of its own.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def resolve_weights_path(path: str) -> Path:
    """checkpoint.load as given, or the newest checkpoint when it names a run folder of osp-train."""
    candidate = Path(path)
    if (candidate / "checkpoints").is_dir():
        latest = latest_checkpoint(candidate)
        if latest is None:
            raise ConfigError(f"checkpoint.load={path!r} is a run folder without a complete checkpoint")
        return latest
    return candidate


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
    for path_key, builtin_key, default in (("model.vae_path", "model.vae", "tiny-random"),
                                           ("model.text_encoder_path", "data.synthetic_seed", 0)):
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
        raise ConfigError(f"{dotted}={ours} but the policy in checkpoint.load={str(weights)!r} was trained with "
                          f"{dotted}={theirs}; set {dotted}={theirs} so that rollouts are made like its "
                          "training data")


def _as_written(value) -> str:
    """A setting as one writes it in a config override: true, false, null, 3, 'tiny-block'."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def run_pretraining(config_name: str, run_dir: str) -> None:
    """Run `osp-train` with `config_name` ("tiny": the packaged tiny config) into `run_dir`, as a subprocess."""
    from osp_megatron.training.cli import packaged_config

    config_path = str(packaged_config("tiny_t2v.yaml")) if config_name == "tiny" else config_name
    command = [sys.executable, "-m", "osp_megatron.training.cli", "--config", config_path, f"run.dir={run_dir}"]
    print(f"[osp-grpo] checkpoint.load={run_dir!r} does not exist yet (grpo.pretrain_if_missing={config_name!r}): "
          f"pretraining it first with `osp-train --config {config_path} run.dir={run_dir}`; GRPO starts when it "
          "ends", flush=True)
    environment = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    result = subprocess.run(command, env=environment)
    if result.returncode != 0:
        raise ConfigError(f"the pretraining for checkpoint.load={run_dir!r} failed (exit status {result.returncode})")


class Policy:
    """The trained model (`module`), an optimizer over its trainable parameters, and the reference policy."""

    def __init__(self, config, device: torch.device, initial_weights: Optional[Path]):
        from osp_megatron.models.pretrained import load_pretrained_weights

        self.config = config
        self.module = build_model(config.model, device)
        if initial_weights is not None:
            load_pretrained_weights(self.module, initial_weights, which="ema" if config.checkpoint.load_ema else "model")
        lora = config.grpo.lora
        self.uses_lora = lora is not None
        if self.uses_lora:
            # Reseeded: adapters are drawn at full size, so every tensor-parallel size gets the same ones.
            torch.manual_seed(config.train.seed + 1)
            apply_lora(self.module, lora.rank, lora.alpha, lora.target_modules)
        self.reference_module = None
        if config.grpo.kl_coef > 0 and not self.uses_lora:
            # Full fine-tuning needs the initial weights kept apart; with LoRA they are the base weights.
            # (A second build plus a state copy: megatron's linears hold process groups, which deepcopy refuses.)
            self.reference_module = build_model(config.model, device)
            self.reference_module.load_state_dict(self.module.state_dict())
            self.reference_module.requires_grad_(False)
        self.optimizer = build_optimizer(self.module, config.train)
        self.ema = EMA(self.module, config.train.ema_decay) if config.train.ema_decay > 0 else None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def velocity(self, latents, timestep, text_states):
        return self.module(latents, timestep, text_states)

    def reference_velocity(self, latents, timestep, text_states):
        """The frozen initial policy: the base model with adapters off (LoRA), or the kept copy."""
        if self.uses_lora:
            with adapters_disabled(self.module):
                return self.module(latents, timestep, text_states)
        return self.reference_module(latents, timestep, text_states)

    def save(self, run_dir, step: int, rank_state: dict, keep_last: Optional[int]) -> Path:
        metadata = {"model_config": to_dict(self.config.model), "config": to_dict(self.config),
                    "job": "osp-grpo", "lora": self.uses_lora}
        return save_checkpoint(run_dir, step, self.module, self.optimizer, self.ema, rank_state=rank_state,
                               metadata=metadata, keep_last=keep_last)

    def load(self, path) -> dict:
        """Restore weights, optimizer and EMA from a checkpoint of this job; returns this rank's saved state."""
        _, rank_state = load_checkpoint(path, self.module, self.optimizer, self.ema)
        return rank_state

    def export_merged(self, run_dir, step: int) -> Path:
        """With LoRA: fold the adapters into the weights and save a plain DiT checkpoint under run_dir/merged
        (what osp-sample and checkpoint.load read). Ends training use of this policy."""
        merge_lora(self.module)
        self.uses_lora = False
        metadata = {"model_config": to_dict(self.config.model), "config": to_dict(self.config),
                    "job": "osp-grpo (LoRA merged)"}
        return save_checkpoint(Path(run_dir) / "merged", step, self.module, metadata=metadata)
