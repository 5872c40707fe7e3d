"""The settings and the DiT that osp-sample and osp-eval render with, from any weights `load_pretrained` reads.

A framework checkpoint brings its saved job config (model, VAE and text-encoder paths); a diffusers folder or
original Wan2.1 weights bring the model's shape and need the VAE and umT5 from local paths.
"""

from pathlib import Path

import torch

from osp_megatron.checkpointing.checkpoint import weights_path
from osp_megatron.checkpointing.metadata import is_complete, read_metadata
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import apply_overrides, from_dict, load_yaml, to_dict
from osp_megatron.engine.config import JobConfig

# Sections of a training checkpoint's config that say how it was trained, not how to sample from it: its
# quantization too (a model trained in HiF8 or FP8 samples in 16 bits unless the quant section asks otherwise),
# and its LoRA settings (a LoRA checkpoint's metadata says how to fold its adapters in).
_TRAINING_SECTIONS = ("run", "train", "checkpoint", "parallel", "quant", "lora")

# What osp-sample and osp-eval read of a job config; a setting outside these is refused (it would be ignored).
# data.synthetic_seed seeds the tiny text encoder and VAE a tiny model was trained with.
SAMPLING_SECTIONS = (
    "model",
    "sample",
    "quant",
    "data.synthetic_seed",
    "parallel.tensor",
    "parallel.data",
    "parallel.ssp",
    "parallel.ulysses",
    "parallel.backend",
    "parallel.timeout_minutes",
)


def resolve_weights(path: str) -> Path:
    """A complete framework checkpoint, the newest one of a run folder, or published weights as given."""
    return weights_path(path, "--checkpoint")


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


def check_sampling_settings(user: dict, job: str = "osp-sample") -> None:
    """Refuse settings (from the YAML file, flags or overrides) that sampling does not read."""
    for dotted in _dotted_keys(user):
        if not any(dotted == allowed or dotted.startswith(allowed + ".") for allowed in SAMPLING_SECTIONS):
            raise ConfigError(
                f"{dotted}: {job} does not use this setting (it would be ignored); it reads "
                f"{', '.join(SAMPLING_SECTIONS)}"
            )


def _dotted_keys(data: dict, prefix: str = ""):
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and not dotted.startswith(("model.", "sample.", "quant.")):
            yield from _dotted_keys(value, dotted)
        else:
            yield dotted


def sampling_config(weights: Path, config_path=None, overrides=(), settings=None, job: str = "osp-sample") -> JobConfig:
    """The job config to sample with: the weights' own, the YAML file, `settings` ({dotted key: value}, from
    command-line flags), then the dotted overrides, each over the one before. Settings sampling would ignore are
    refused (the weights' own training settings are dropped, not refused)."""
    if is_complete(weights):
        metadata = read_metadata(weights)
        data = metadata.get("config") or {"model": metadata["model_config"]}
        for key in _TRAINING_SECTIONS:
            data.pop(key, None)
        # The training run's own sample path is not where an osp-sample video goes.
        (data.get("sample") or {}).pop("output", None)
        published = False
    else:
        from osp_megatron.checkpointing.pretrained import pretrained_model_config

        data = {"model": to_dict(pretrained_model_config(weights))}
        root = _pipeline_root(weights)
        for key, folder in (("vae_path", "vae"), ("text_encoder_path", "text_encoder")):
            if root is not None and (root / folder).is_dir():
                data["model"][key] = str(root)
        published = True
    user = load_yaml(config_path) if config_path is not None else {}
    for dotted, value in (settings or {}).items():
        _set(user, dotted, value)
    apply_overrides(user, list(overrides))
    check_sampling_settings(user, job)
    _merge(data, user)
    config = from_dict(JobConfig, data)
    if published:
        missing = [key for key in ("vae_path", "text_encoder_path") if getattr(config.model, key) is None]
        if missing:
            raise ConfigError(
                f"{str(weights)!r} holds only the DiT; set {' and '.join('model.' + k for k in missing)} (or --vae / "
                "--text-encoder) to local folders of the Wan VAE and umT5, e.g. those of a Wan2.1 diffusers "
                "download; without them videos would come from tiny random encoders"
            )
    return config


def load_sampling_model(config: JobConfig, weights: Path, which: str, device: torch.device):
    """The DiT of `config.model` on `device` holding the weights at `weights` (a LoRA checkpoint's adapters folded
    into its base), in sample.precision, quantized once when config.quant asks, for inference: the engine's
    model building (engine/model.py). Needs the process groups (init_distributed) when the layout is parallel."""
    from osp_megatron.engine.model import load_for_inference

    return load_for_inference(config, weights, which, device).module
