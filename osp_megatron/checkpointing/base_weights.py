"""The frozen base of a LoRA checkpoint: a reference (path and fingerprint) instead of a copy, checked on use.

A LoRA job's checkpoint stores its adapters only; the base it adapts (a framework checkpoint or published Wan2.1
weights) is named by path and identified by a fingerprint, so a moved base is found and a changed one refused.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from osp_megatron.checkpointing.integrity import MANIFEST, file_digest
from osp_megatron.checkpointing.metadata import is_complete, read_metadata
from osp_megatron.config.errors import ConfigError

# metadata.json entries of a LoRA checkpoint.
LORA_KEY, BASE_KEY = "lora", "base_weights"


@dataclass(frozen=True)
class BaseWeights:
    path: str
    fingerprint: str
    which: str = "model"  # a framework checkpoint's raw ("model") or EMA ("ema") weights


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".json", ".pth", ".pt", ".bin", ".ckpt")
    )


def weights_fingerprint(path: str | Path) -> str:
    """A digest of the weights at `path`: of a framework checkpoint's manifest (its files' sizes and CRC-32s:
    instant), else of the sizes and CRC-32s of the weight files (one read of them)."""
    path = Path(path)
    digest = hashlib.sha256()
    if is_complete(path) and (path / MANIFEST).is_file():
        digest.update((path / MANIFEST).read_bytes())
        return "manifest:" + digest.hexdigest()[:32]
    for file in _weight_files(path):
        digest.update(
            json.dumps([str(file.relative_to(path)) if path.is_dir() else file.name, file_digest(file)]).encode()
        )
    return "files:" + digest.hexdigest()[:32]


def reference_to(path: str | Path, which: str = "model") -> BaseWeights:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint.load={str(path)!r} does not exist; a LoRA job needs its base weights there")
    return BaseWeights(str(path.resolve()), weights_fingerprint(path), which)


def lora_metadata(checkpoint: str | Path) -> dict | None:
    """{'lora': LoraConfig fields, 'base_weights': BaseWeights fields} of a LoRA checkpoint, else None."""
    metadata = read_metadata(checkpoint)
    if not metadata.get(LORA_KEY):
        return None
    if not isinstance(metadata[LORA_KEY], dict) or BASE_KEY not in metadata:
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} holds LoRA adapters but no reference to their base "
            "weights (written by an older version, which stored the base inside); merge it with "
            "the version that wrote it"
        )
    return {LORA_KEY: metadata[LORA_KEY], BASE_KEY: metadata[BASE_KEY]}


def resolve_base(checkpoint: str | Path, given: str | Path | None = None) -> BaseWeights:
    """The base weights of a LoRA checkpoint, checked against its fingerprint: at `given` (e.g. checkpoint.load)
    when set, else where the checkpoint says. A base that changed is an error naming both fingerprints."""
    info = lora_metadata(checkpoint)
    if info is None:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is not a LoRA checkpoint")
    recorded = BaseWeights(**info[BASE_KEY])
    path = Path(given) if given is not None else Path(recorded.path)
    if not path.exists():
        raise ConfigError(
            f"the base weights of LoRA checkpoint {str(checkpoint)!r} are not at {str(path)!r} "
            f"anymore; pass their new place (checkpoint.load=... or --base PATH)"
        )
    found = weights_fingerprint(path)
    if found != recorded.fingerprint:
        raise ConfigError(
            f"the base weights at {str(path)!r} are not those LoRA checkpoint {str(checkpoint)!r} "
            f"was trained on (fingerprint {found} instead of {recorded.fingerprint})"
        )
    return BaseWeights(str(path), found, recorded.which)


def lora_checkpoint_metadata(lora_config, base: BaseWeights) -> dict:
    return {LORA_KEY: asdict(lora_config), BASE_KEY: asdict(base)}


def merged_tensor(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """A base weight with its adapter folded in: W + scaling B A (in float64, then W's dtype)."""
    delta = scaling * (lora_b.double() @ lora_a.double())
    return (base.double() + delta).to(base.dtype)
