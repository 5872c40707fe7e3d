"""Rollout prompts and their text states: from a text or JSONL file, pre-encoded webdataset shards, inline
prompts or the synthetic captions; each prompt is encoded once and its states cached.

Which prompts an iteration uses is a pure function of (seed, iteration), so resuming needs no loader state.
"""

import json
import os

import numpy as np
import torch

from osp_megatron.config.errors import ConfigError


def _read_text_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _read_jsonl(path: str, key: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"prompts.path {path!r} line {number}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ConfigError(
                    f"prompts.path {path!r} line {number}: no string field {key!r} (set prompts.jsonl_key)"
                )
            prompts.append(record[key])
    return prompts


def _read_shards(path, text_len: int, text_dim: int, limit: int) -> tuple[list[str], list[torch.Tensor]]:
    """Captions (txt) and unpadded text states (text.npy) of up to `limit` samples, in shard order."""
    from osp_megatron.data.shards import _load_npy, iter_raw_samples, resolve_shards

    prompts, states = [], []
    for shard in resolve_shards(path):
        for raw in iter_raw_samples(shard.path):
            text = _load_npy(raw, "text.npy", shard.path)
            if text.ndim != 2 or text.shape[1] != text_dim or not 1 <= text.shape[0] <= text_len:
                raise ConfigError(
                    f"shard {shard.path}, sample {raw['__key__']!r}: text.npy has shape "
                    f"{tuple(text.shape)}, expected [length <= model.text_len={text_len}, "
                    f"model.text_dim={text_dim}]"
                )
            if "txt" not in raw:
                raise ConfigError(f"shard {shard.path}, sample {raw['__key__']!r}: no 'txt' caption")
            prompts.append(raw["txt"].decode("utf-8"))
            states.append(torch.from_numpy(text.astype(np.float32)))
            if len(prompts) == limit:
                return prompts, states
    return prompts, states


def detect_format(path, declared: str) -> str:
    if declared != "auto":
        return declared
    if not isinstance(path, str) or os.path.isdir(path) or path.endswith(".tar"):
        return "shards"
    return "jsonl" if path.endswith((".jsonl", ".json")) else "text"


class PromptSet:
    """The prompts of a job, with text states [text_len, text_dim] computed at most once per prompt."""

    def __init__(self, prompts: list[str], text_len: int, text_dim: int, encoder_factory=None, states=None):
        if not prompts:
            raise ConfigError("the prompt source holds no prompt")
        self.prompts = list(prompts)
        self.text_len, self.text_dim = text_len, text_dim
        # Builds the TextEncoder on first use: pre-encoded prompts never load umT5 unless the negative
        # prompt needs it.
        self.encoder_factory = encoder_factory
        self._encoder = None
        self._cache: dict[int, torch.Tensor] = dict(enumerate(states)) if states is not None else {}
        self._null_states = None

    def __len__(self) -> int:
        return len(self.prompts)

    def encode(self, prompts: list[str]):
        if self._encoder is None:
            if self.encoder_factory is None:
                raise ConfigError("these prompts have no pre-encoded text states and no text encoder is configured")
            self._encoder = self.encoder_factory()
        return self._encoder.encode(prompts)

    def _padded(self, states: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(self.text_len, self.text_dim)
        padded[: states.shape[0]] = states[: self.text_len]
        return padded

    def states(self, indices) -> torch.Tensor:
        """Text states [len(indices), text_len, text_dim]; unseen prompts are encoded in one batch, then cached."""
        missing = sorted({int(i) for i in indices if int(i) not in self._cache})
        if missing:
            encoded, lengths = self.encode([self.prompts[i] for i in missing])
            for i, row, length in zip(missing, encoded, lengths):
                self._cache[i] = row[: int(length)].clone()
        return torch.stack([self._padded(self._cache[int(i)]) for i in indices])

    def null_states(self, negative_prompt: str) -> torch.Tensor:
        """States [1, text_len, text_dim] of the negative prompt (the unconditional branch of guidance);
        encoded once."""
        if self._null_states is None:
            encoded, _ = self.encode([negative_prompt])
            self._null_states = encoded[:, : self.text_len]
        return self._null_states

    def indices_for_iteration(self, iteration: int, count: int, seed: int) -> list[int]:
        """The `count` prompt indices of an iteration: consecutive positions of a stream that visits every
        prompt once per epoch in an order drawn from (seed, epoch)."""
        size = len(self.prompts)
        picked = []
        for position in range(iteration * count, (iteration + 1) * count):
            epoch, offset = divmod(position, size)
            order = np.random.default_rng([seed, epoch]).permutation(size)
            picked.append(int(order[offset]))
        return picked


def build_prompt_set(config, model_config, encoder_factory) -> PromptSet:
    """The PromptSet a `prompts:` section names; `encoder_factory()` builds the text encoder on first need."""
    text_len, text_dim = model_config.text_len, model_config.text_dim
    if config.synthetic:
        from osp_megatron.data.synthetic import all_captions

        return PromptSet(all_captions(), text_len, text_dim, encoder_factory)
    if config.prompts:
        return PromptSet(config.prompts, text_len, text_dim, encoder_factory)
    kind = detect_format(config.path, config.format)
    if kind == "shards":
        prompts, states = _read_shards(config.path, text_len, text_dim, config.max_prompts)
        return PromptSet(prompts, text_len, text_dim, encoder_factory, states)
    if not os.path.isfile(config.path):
        raise ConfigError(f"prompts.path {config.path!r} does not exist")
    prompts = _read_text_file(config.path) if kind == "text" else _read_jsonl(config.path, config.jsonl_key)
    return PromptSet(prompts[: config.max_prompts], text_len, text_dim, encoder_factory)
