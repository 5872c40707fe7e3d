"""Lazy access to state dicts stored as safetensors (one file, or shards with an index) or torch pickles.

Tensors are read one at a time by name, so converting a 14B checkpoint never holds all of it in memory.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from osp_megatron.config.errors import ConfigError

SAFETENSORS = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Training scripts often save {"model": state_dict, "optimizer": ...} or similar; these keys may hold the weights.
WRAPPER_KEYS = ("state_dict", "model", "module", "ema", "model_state_dict", "net")


class TensorFiles:
    """Named tensors spread over one or more files; `get(name)` reads only that tensor."""

    def __init__(
        self,
        description: str,
        locations: dict[str, Path] | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None,
        in_memory: dict[str, torch.Tensor] | None = None,
    ):
        self.description = description
        self._locations = locations or {}
        self._shapes = shapes or {}
        self._in_memory = in_memory or {}

    def keys(self) -> list[str]:
        return list(self._locations) + list(self._in_memory)

    def file_of(self, name: str) -> str:
        return str(self._locations.get(name, self.description))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._in_memory:
            return tuple(self._in_memory[name].shape)
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        if name in self._in_memory:
            return self._in_memory[name]
        with safe_open(str(self._locations[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")


def open_safetensors(paths: list[Path]) -> TensorFiles:
    """Several safetensors files read as one state dict (their key sets must not overlap)."""
    locations: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        _require_file(path, "weight file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise ConfigError(f"weight file {str(path)!r} is not a readable safetensors file: {err}") from None
        for name in found:
            if name in locations:
                raise ConfigError(f"tensor {name!r} is stored in both {str(locations[name])!r} and {str(path)!r}")
            locations[name] = path
        shapes.update(found)
    description = str(paths[0]) if len(paths) == 1 else f"{len(paths)} safetensors files in {str(paths[0].parent)!r}"
    return TensorFiles(description, locations=locations, shapes=shapes)


def open_safetensors_index(index: Path) -> TensorFiles:
    """A sharded safetensors state dict described by its `*.safetensors.index.json` (a `weight_map`)."""
    _require_file(index, "safetensors index")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{str(index)!r} is not a safetensors index (a JSON object with a 'weight_map')") from None
    shards = sorted({index.parent / file for file in weight_map.values()})
    missing = [str(shard) for shard in shards if not shard.is_file()]
    if missing:
        raise ConfigError(f"safetensors index {str(index)!r} lists shard files that do not exist: {missing}")
    files = open_safetensors(shards)
    stray = sorted(name for name, path in files._locations.items() if index.parent / weight_map.get(name, "") != path)
    if stray:
        raise ConfigError(f"shards of {str(index)!r} hold tensors its weight_map places elsewhere: {stray[:10]}")
    files.description = str(index)
    return files


def open_torch_file(path: Path, state_key: str | None = None) -> TensorFiles:
    """A torch.save'd state dict; memory-mapped when the file allows it, so tensors are paged in on use."""
    _require_file(path, "weight file")
    try:
        try:
            data = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            # Files in torch's legacy (non-zip) format cannot be memory-mapped.
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors vary by torch version
        raise ConfigError(f"weight file {str(path)!r} is not a readable torch checkpoint: {err}") from None
    state = _unwrap_state_dict(data, path, state_key)
    return TensorFiles(str(path), in_memory=state)


def _unwrap_state_dict(data, path: Path, state_key: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} holds a {type(data).__name__}, not a state dict")
    if state_key is not None:
        for part in state_key.split("."):
            if not isinstance(data, dict) or part not in data:
                raise ConfigError(f"{str(path)!r} has no entry {state_key!r}; top-level keys: {sorted(data)[:20]}")
            data = data[part]
        return _tensors_only(data, path)
    if any(torch.is_tensor(value) for value in data.values()):
        return _tensors_only(data, path)
    candidates = [
        key
        for key in WRAPPER_KEYS
        if isinstance(data.get(key), dict) and any(torch.is_tensor(value) for value in data[key].values())
    ]
    if len(candidates) == 1:
        return _tensors_only(data[candidates[0]], path)
    if not candidates:
        raise ConfigError(
            f"{str(path)!r} holds no tensors at top level nor under any of {list(WRAPPER_KEYS)}; "
            "pass the key that holds the weights (--state-key)"
        )
    raise ConfigError(f"{str(path)!r} holds weights under several keys {candidates}; choose one with --state-key")


def _tensors_only(data: dict, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise ConfigError(f"the selected entry of {str(path)!r} is not a state dict")
    return {name: value for name, value in data.items() if torch.is_tensor(value)}


def open_weights(path: Path, state_key: str | None = None) -> TensorFiles:
    """The state dict of one weight file (.safetensors, *.safetensors.index.json, .pth/.pt/.bin/.ckpt)."""
    name = path.name
    if name.endswith(INDEX_SUFFIX):
        return open_safetensors_index(path)
    if name.endswith(SAFETENSORS):
        return open_safetensors([path])
    if name.endswith(TORCH_SUFFIXES):
        return open_torch_file(path, state_key)
    raise ConfigError(
        f"{str(path)!r}: unknown weight file type; expected .safetensors, "
        f"*{INDEX_SUFFIX} or one of {', '.join(TORCH_SUFFIXES)}"
    )


def find_weight_file(directory: Path) -> Path:
    """The one weight file (or index) of a folder holding a single model's weights."""
    indexes = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise ConfigError(
            f"{str(directory)!r} holds several safetensors indexes {[p.name for p in indexes]}; name the one to use"
        )
    safetensors = sorted(directory.glob(f"*{SAFETENSORS}"))
    if len(safetensors) == 1:
        return safetensors[0]
    if len(safetensors) > 1:
        raise ConfigError(
            f"{str(directory)!r} holds several safetensors files but no *{INDEX_SUFFIX} saying "
            "which tensors each one holds; name the file to use"
        )
    pickles = sorted(p for suffix in TORCH_SUFFIXES for p in directory.glob(f"*{suffix}"))
    if len(pickles) == 1:
        return pickles[0]
    if len(pickles) > 1:
        raise ConfigError(
            f"{str(directory)!r} holds several torch checkpoints {[p.name for p in pickles]}; name the file to use"
        )
    raise ConfigError(
        f"{str(directory)!r} holds no weight file (*.safetensors, *{INDEX_SUFFIX}, "
        f"{', '.join('*' + s for s in TORCH_SUFFIXES)})"
    )
