"""Tiny random-weight Wan2.1 transformers saved in every published layout, built by the tests themselves.

diffusers is imported inside the fixtures so that worker processes importing a test module stay light.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from osp_megatron.checkpointing.wan_keys import DIFFUSERS, ORIGINAL, OURS, rename


def random_diffusers_model(seed: int = 0, **overrides):
    """WanTransformer3DModel with every parameter random, norms and zero-initialised ones included."""
    from osp_megatron.testing import random_diffusers_wan

    return random_diffusers_wan(seed, **overrides)


def diffusers_output(model, latents, timestep, text):
    with torch.no_grad():
        return model(latents, timestep, text, return_dict=False)[0]


def random_inputs(model, grid, text_len: int = 7, batch: int = 2, seed: int = 1):
    """(latents, timestep, text) for a diffusers model and a post-patchify token grid (T, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    shape = [g * p for g, p in zip(grid, config.patch_size)]
    latents = torch.randn(batch, config.in_channels, *shape, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 1000
    text = torch.randn(batch, text_len, config.text_dim, generator=generator)
    return latents, timestep, text


def original_state_dict(model) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under Wan's original parameter names."""
    return {
        rename(rename(name, DIFFUSERS, OURS), OURS, ORIGINAL): tensor.detach().clone()
        for name, tensor in model.state_dict().items()
    }


def original_config(model) -> dict:
    """config.json as Wan's original repository writes it for a WanModel."""
    config = model.config
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": "t2v",
        "patch_size": list(config.patch_size),
        "text_len": 512,
        "in_dim": config.in_channels,
        "dim": config.num_attention_heads * config.attention_head_dim,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "text_dim": config.text_dim,
        "out_dim": config.out_channels,
        "num_heads": config.num_attention_heads,
        "num_layers": config.num_layers,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
    }


def save_sharded_safetensors(state: dict[str, torch.Tensor], folder: Path, parts: int = 3) -> Path:
    """Save `state` as `parts` safetensors shards plus the *.safetensors.index.json naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for part in range(parts):
        file = f"diffusion_pytorch_model-{part + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {name: state[name].contiguous() for name in names[part::parts]}
        save_file(chunk, str(folder / file))
        weight_map.update({name: file for name in chunk})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="module", autouse=True)
def release_process_groups():
    """Tear down the one-rank group load_pretrained sets up, so later tests that fork ranks start clean."""
    yield
    from osp_megatron.parallel.state import destroy_distributed

    destroy_distributed()


@pytest.fixture
def diffusers_loader(monkeypatch):
    """WanTransformer3DModel.from_pretrained, usable without `accelerate`.

    diffusers refuses to honour the model's keep-in-fp32 module list without accelerate; in float32 that list
    changes nothing, so the test drops it there and still reads config.json and the safetensors as shipped.
    """
    from diffusers import WanTransformer3DModel
    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():
        monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    return WanTransformer3DModel.from_pretrained


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """(model, folder): one random tiny WanTransformer3DModel saved with save_pretrained."""
    model = random_diffusers_model(seed=3)
    folder = tmp_path_factory.mktemp("diffusers") / "transformer"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def wan():
    """The helpers above, for test modules (conftest itself is not importable under importlib mode)."""
    return SimpleNamespace(
        random_diffusers_model=random_diffusers_model,
        diffusers_output=diffusers_output,
        random_inputs=random_inputs,
        original_state_dict=original_state_dict,
        original_config=original_config,
        save_sharded_safetensors=save_sharded_safetensors,
    )
