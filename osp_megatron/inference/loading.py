"""The settings and the DiT that osp-sample and osp-eval render with, from any weights `load_pretrained` reads.

A framework checkpoint brings its saved job config (model, VAE and text-encoder paths); a diffusers folder or
original Wan2.1 weights bring the model's shape and need the VAE and umT5 from local paths.
"""

from pathlib import Path

import torch

from osp_megatron.checkpointing.checkpoint import latest_checkpoint
from osp_megatron.checkpointing.metadata import is_complete, read_metadata
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.job import JobConfig
from osp_megatron.config.loader import apply_overrides, from_dict, load_yaml, to_dict

# Sections of a training checkpoint's config that say how it was trained, not how to sample from it.
_TRAINING_SECTIONS = ("run", "train", "checkpoint", "parallel")


def resolve_weights(path: str) -> Path:
    """A complete framework checkpoint, the newest one of a run folder, or published weights as given."""
    weights = Path(path)
    if not weights.exists():
        raise ConfigError(f"--checkpoint {path!r} does not exist")
    if is_complete(weights):
        return weights
    newest = latest_checkpoint(weights) if weights.is_dir() else None
    return newest if newest is not None else weights


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _pipeline_root(weights: Path):
    """The diffusers pipeline folder around a transformer folder (it holds vae/ and text_encoder/), if any."""
    for folder in (weights, weights.parent):
        if (folder / "transformer").is_dir():
            return folder
    return None


def _set(data: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[key] = value


def sampling_config(weights: Path, config_path=None, overrides=(), settings=None) -> JobConfig:
    """The job config to sample with: the weights' own, the YAML file, `settings` ({dotted key: value}, from
    command-line flags), then the dotted overrides, each over the one before."""
    if is_complete(weights):
        metadata = read_metadata(weights)
        data = metadata.get("config") or {"model": metadata["model_config"]}
        for key in _TRAINING_SECTIONS:
            data.pop(key, None)
        # The training run's own sample path is not where an osp-sample video goes.
        (data.get("sample") or {}).pop("output", None)
        published = False
    else:
        from osp_megatron.models.pretrained import pretrained_model_config

        data = {"model": to_dict(pretrained_model_config(weights))}
        root = _pipeline_root(weights)
        for key, folder in (("vae_path", "vae"), ("text_encoder_path", "text_encoder")):
            if root is not None and (root / folder).is_dir():
                data["model"][key] = str(root)
        published = True
    if config_path is not None:
        _merge(data, load_yaml(config_path))
    for dotted, value in (settings or {}).items():
        _set(data, dotted, value)
    apply_overrides(data, list(overrides))
    config = from_dict(JobConfig, data)
    if published:
        missing = [key for key in ("vae_path", "text_encoder_path") if getattr(config.model, key) is None]
        if missing:
            raise ConfigError(
                f"{str(weights)!r} holds only the DiT; set {' and '.join('model.' + k for k in missing)} (or --vae / "
                "--text-encoder) to local folders of the Wan VAE and umT5, e.g. those of a Wan2.1 diffusers "
                "download; without them videos would come from tiny random encoders")
    return config


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "bf16" or (precision == "auto" and device.type != "cpu"):
        return torch.bfloat16
    return torch.float32


def load_sampling_model(config: JobConfig, weights: Path, which: str, device: torch.device):
    """The DiT of `config.model` on `device` holding the weights at `weights`, in sample.precision, for inference.

    Needs the process groups (init_distributed) when the layout is parallel: the model is built for them.
    """
    from osp_megatron.models.builder import build_model
    from osp_megatron.models.pretrained import load_pretrained_weights

    model = build_model(config.model, device, initialize=False)
    load_pretrained_weights(model, weights, which=which)
    return model.to(inference_dtype(config.sample.precision, device)).eval().requires_grad_(False)
