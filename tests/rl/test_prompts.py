"""Prompt sources (text, JSONL, pre-encoded shards, inline), encode-once caching, and the iteration order."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.models.config import ModelConfig
from osp_megatron.rl.config import PromptConfig
from osp_megatron.rl.prompts import build_prompt_set

MODEL = from_dict(ModelConfig, {"preset": "tiny"}, "model")


class CountingEncoder:
    """Encodes a prompt as its length in every channel; counts the prompts it was asked for."""

    def __init__(self):
        self.seen = []

    def encode(self, prompts):
        self.seen += prompts
        states = torch.zeros(len(prompts), MODEL.text_len, MODEL.text_dim)
        lengths = torch.tensor([min(len(p.split()), MODEL.text_len) or 1 for p in prompts])
        for i, length in enumerate(lengths):
            states[i, :length] = float(len(prompts[i]))
        return states, lengths


def _prompt_set(encoder=None, **section):
    config = from_dict(PromptConfig, section, "prompts")
    return build_prompt_set(config, MODEL, lambda: encoder)


def test_text_and_jsonl_files_are_encoded_once(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square moving up  \n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "x y"}) + "\n" + json.dumps({"caption": "z"}) + "\n")
    encoder = CountingEncoder()
    prompts = _prompt_set(encoder, path=str(tmp_path / "p.txt"))
    assert prompts.prompts == ["a red circle", "a blue square moving up"]
    first = prompts.states([1, 0, 1])
    prompts.states([0, 1])
    assert encoder.seen == ["a red circle", "a blue square moving up"]  # one encode per prompt, ever
    assert first.shape == (3, MODEL.text_len, MODEL.text_dim) and first[0, 4, 0] == 23 and first[0, 5, 0] == 0
    assert _prompt_set(CountingEncoder(), path=str(tmp_path / "p.jsonl"), jsonl_key="caption").prompts == ["x y", "z"]
    with pytest.raises(ConfigError, match="line 1: no string field 'prompt'"):
        _prompt_set(CountingEncoder(), path=str(tmp_path / "p.jsonl"))


def test_shards_give_captions_and_pre_encoded_states_without_an_encoder(tmp_path):
    """latent.npy / text.npy / txt / json shards (osp-data's format): txt and text.npy are read, zero-padded."""
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer) as writer:
        for i in range(3):
            text = np.full((2 + i, MODEL.text_dim), i + 1, dtype=np.float32)
            npy = io.BytesIO()
            np.save(npy, text)
            writer.write(
                {"__key__": f"s{i}", "text.npy": npy.getvalue(), "txt": f"caption {i}".encode(), "json": b"{}"}
            )
    (tmp_path / "shard-000000.tar").write_bytes(buffer.getvalue())
    prompts = _prompt_set(None, path=str(tmp_path))
    assert prompts.prompts == ["caption 0", "caption 1", "caption 2"]
    states = prompts.states([2])
    assert states[0, :4].eq(3).all() and states[0, 4:].eq(0).all()


def test_iteration_order_visits_every_prompt_once_per_epoch():
    prompts = _prompt_set(CountingEncoder(), prompts=[f"p{i}" for i in range(5)])
    picked = [prompts.indices_for_iteration(it, 2, seed=3) for it in range(5)]
    flat = sum(picked, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
    assert picked == [prompts.indices_for_iteration(it, 2, seed=3) for it in range(5)]  # a function of the seed
    assert picked != [prompts.indices_for_iteration(it, 2, seed=4) for it in range(5)]


def test_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of prompts.path"):
        _prompt_set(path="x.txt", prompts=["a"])
    with pytest.raises(ConfigError, match="does not exist"):
        _prompt_set(CountingEncoder(), path="/nonexistent/prompts.txt")
