"""Our DiT computes what diffusers' WanTransformer3DModel computes on the same weights, from every layout.

Reference weights are random everywhere (norms and zero-initialised tables too) so a wrong mapping shows.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from osp_megatron.checkpointing.pretrained import load_pretrained
from osp_megatron.checkpointing.sharded import iter_full_tensors, partition_dim
from osp_megatron.checkpointing.wan_convert import import_checkpoint
from osp_megatron.checkpointing.wan_keys import parameter_layout
from osp_megatron.config.errors import ConfigError
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.state import ensure_single_rank_group


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def read_checkpoint(folder) -> dict[str, torch.Tensor]:
    return dict(iter_full_tensors(folder / "model"))


# (patch size, heads, head_dim, text tokens, post-patchify grid T x H x W): odd sizes, several RoPE splits.
CASES = [
    ((1, 2, 2), 2, 12, 7, (3, 5, 3)),
    ((2, 2, 2), 4, 6, 5, (2, 3, 5)),
    ((1, 1, 1), 3, 8, 9, (3, 5, 7)),
]


@pytest.mark.parametrize("patch,heads,head_dim,text_len,grid", CASES)
def test_forward_matches_diffusers(patch, heads, head_dim, text_len, grid, tmp_path, wan):
    """A diffusers folder loaded with load_pretrained gives diffusers' output within 1e-5 relative error (fp32)."""
    reference = wan.random_diffusers_model(
        seed=heads, patch_size=patch, num_attention_heads=heads, attention_head_dim=head_dim
    )
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    inputs = wan.random_inputs(reference, grid, text_len=text_len, seed=heads)
    expected = wan.diffusers_output(reference, *inputs)
    with torch.no_grad():
        got = model(*inputs)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-5


def test_parity_check_can_fail(tiny_diffusers, wan):
    """Swapping one pair of weights between blocks changes the output far beyond the parity tolerance."""
    reference, folder = tiny_diffusers
    model = load_pretrained(folder)
    inputs = wan.random_inputs(reference, (3, 5, 3))
    expected = wan.diffusers_output(reference, *inputs)
    with torch.no_grad():
        first, second = model.blocks[0].norm2.weight, model.blocks[1].norm2.weight
        swapped = first.clone()
        first.copy_(second)
        second.copy_(swapped)
        assert relative_error(model(*inputs), expected) > 1e-3


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_parameter_layout_matches_the_model(cross_attn_norm):
    """wan_keys.parameter_layout lists exactly the model's parameters, full shapes and megatron split dims."""
    ensure_single_rank_group()
    config = ModelConfig(
        dim=24,
        num_heads=2,
        num_layers=2,
        ffn_dim=40,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        cross_attn_norm=cross_attn_norm,
    )
    layout = parameter_layout(config)
    params = dict(build_model(config).named_parameters())
    assert list(params) == list(layout)
    for name, param in params.items():
        assert tuple(param.shape) == layout[name].shape, name
        assert partition_dim(param) == layout[name].partition_dim, name


def test_original_names_agree_with_diffusers_converter(tiny_diffusers, wan):
    """Our original-layout names, run through diffusers' own original->diffusers converter, give its state dict."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    reference, _ = tiny_diffusers
    converted = convert_wan_transformer_to_diffusers(wan.original_state_dict(reference))
    state = reference.state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[name], state[name]) for name in state)


def test_original_layouts_import_like_diffusers(tiny_diffusers, wan, tmp_path):
    """Original-layout .pth, .safetensors and sharded+index checkpoints import to the diffusers import, bit for bit."""
    reference, folder = tiny_diffusers
    expected = import_checkpoint(folder, tmp_path / "from_diffusers")
    expected_tensors = read_checkpoint(tmp_path / "from_diffusers")
    original = wan.original_state_dict(reference)

    torch.save({"model": original, "step": 7}, tmp_path / "wrapped.pth")  # no config.json: shapes + num_heads
    single = tmp_path / "single"
    single.mkdir()
    save_file(original, str(single / "diffusion_pytorch_model.safetensors"))
    (single / "config.json").write_text(json.dumps(wan.original_config(reference)))
    sharded = tmp_path / "sharded"
    wan.save_sharded_safetensors(original, sharded)
    (sharded / "config.json").write_text(json.dumps(wan.original_config(reference)))
    prefixed = tmp_path / "prefixed.safetensors"  # ComfyUI-style wrapping prefix
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, str(prefixed))

    sources = [
        (tmp_path / "wrapped.pth", {"num_heads": 2}),
        (single / "diffusion_pytorch_model.safetensors", {}),
        (sharded, {}),
        (sharded / "diffusion_pytorch_model.safetensors.index.json", {}),
        (prefixed, {"num_heads": 2}),
    ]
    for number, (source, overrides) in enumerate(sources):
        summary = import_checkpoint(source, tmp_path / f"ours{number}", overrides=overrides)
        assert summary.source_layout == "original" and not summary.missing and not summary.unexpected
        assert summary.model_config == expected.model_config, source
        tensors = read_checkpoint(tmp_path / f"ours{number}")
        assert tensors.keys() == expected_tensors.keys()
        assert all(torch.equal(tensors[name], expected_tensors[name]) for name in tensors), source


def test_headless_original_checkpoint_needs_num_heads(tiny_diffusers, wan, tmp_path):
    """Without config.json the head count of an unknown width cannot be guessed: the error says to set it."""
    reference, _ = tiny_diffusers
    save_file(wan.original_state_dict(reference), str(tmp_path / "weights.safetensors"))
    with pytest.raises(ConfigError, match="num_heads"):
        import_checkpoint(tmp_path / "weights.safetensors", tmp_path / "out")


def test_fused_diffusers_projections_import(tiny_diffusers, wan, tmp_path):
    """State dicts of diffusers models with fused q/k/v (with or without the separate copies) import the same."""
    reference, folder = tiny_diffusers
    import_checkpoint(folder, tmp_path / "plain")
    expected = read_checkpoint(tmp_path / "plain")
    fused = wan.random_diffusers_model(seed=3)
    fused.fuse_qkv_projections()
    state = {name: tensor.contiguous() for name, tensor in fused.state_dict().items()}
    separate = [
        name
        for name in state
        if ".attn1.to_q." in name
        or ".attn1.to_k." in name
        or ".attn1.to_v." in name
        or ".attn2.to_k." in name
        or ".attn2.to_v." in name
    ]
    assert any(".to_qkv." in name for name in state) and separate
    for label, tensors in [("both", state), ("fused_only", {k: v for k, v in state.items() if k not in separate})]:
        target = tmp_path / label
        target.mkdir()
        save_file(tensors, str(target / "diffusion_pytorch_model.safetensors"))
        (target / "config.json").write_text((folder / "config.json").read_text())
        summary = import_checkpoint(target, tmp_path / f"ours_{label}")
        assert not summary.unexpected and not summary.missing
        got = read_checkpoint(tmp_path / f"ours_{label}")
        assert all(torch.equal(got[name], expected[name]) for name in expected), label


@pytest.mark.parametrize("preset,heads,ffn_dim,layers", [("wan-1.3b", 12, 8960, 30), ("wan-14b", 40, 13824, 40)])
def test_published_sizes_map_one_to_one(preset, heads, ffn_dim, layers):
    """diffusers' published Wan2.1 T2V configs give our preset's dimensions, and every parameter of that
    diffusers model (built on the meta device) maps onto ours with the same shape."""
    from diffusers import WanTransformer3DModel

    from osp_megatron.checkpointing.wan_config import fields_from_diffusers, make_model_config
    from osp_megatron.checkpointing.wan_keys import plan_sources
    from osp_megatron.models.config import PRESETS

    published = dict(
        _class_name="WanTransformer3DModel",
        patch_size=[1, 2, 2],
        num_attention_heads=heads,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=ffn_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )
    config = make_model_config(fields_from_diffusers(published, "config.json"))
    assert config.preset == preset
    assert all(getattr(config, key) == value for key, value in PRESETS[preset].items() if key != "full_blocks")
    with torch.device("meta"):
        reference = WanTransformer3DModel(**{k: v for k, v in published.items() if not k.startswith("_")})
    shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    layout = parameter_layout(config)
    pieces, missing, unexpected = plan_sources(layout, shapes, "diffusers")
    assert not missing and not unexpected
    assert all(shapes[pieces[name].source] == info.shape for name, info in layout.items())
