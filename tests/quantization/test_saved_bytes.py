"""FP8 training keeps no more bytes for the backward than bf16: 8-bit codes of GEMM inputs, bf16 activations."""

import pytest
import torch

from osp_megatron.config.loader import from_dict
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.state import ensure_single_rank_group
from osp_megatron.quantization import QuantConfig, apply_quantization
from osp_megatron.training.activation_profile import SavedTensorCensus


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    ensure_single_rank_group()


def _model(recipe: str):
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", "sparse_ratio": 2, "full_blocks": 1}, "model"))
    if recipe != "none":
        apply_quantization(model, from_dict(QuantConfig, {"recipe": recipe}, "quant"))
    return model


def _kept(model, block_index: int) -> dict:
    census = SavedTensorCensus(model, model.blocks[block_index])
    generator = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 16, 2, 16, 16, generator=generator), torch.randn(2, 32, 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), census.recording():
        out = model(latents, torch.tensor([30.0, 700.0]), text)
    kept = census.kept()  # while `out` holds the graph
    del out
    return kept


@pytest.mark.parametrize("recipe", ["fp8_hybrid", "fp8_delayed", "hif8"])
@pytest.mark.parametrize("block_index", [0, 1])  # a full-attention and a Skiparse block
def test_quantized_block_keeps_no_more_than_bf16(recipe, block_index):
    """Per block, the quantized recipes save at most bf16's activation bytes and weight copies (FP8 recipes
    strictly less: their GEMM inputs and weights are kept as 1-byte codes)."""
    bf16, quantized = _kept(_model("none"), block_index), _kept(_model(recipe), block_index)
    assert quantized["block"] <= bf16["block"] and quantized["block_weights"] <= bf16["block_weights"]
    if recipe.startswith("fp8"):
        assert quantized["block"] < bf16["block"] and 2 * quantized["block_weights"] <= bf16["block_weights"]


def test_quantized_linear_returns_the_autocast_dtype():
    """Under bf16 autocast a quantized linear returns bf16 like the unquantized one (a float32 output after
    its float32 bias would double the bytes of the activations up to the next GEMM)."""
    model = _model("fp8_hybrid")
    linear = model.blocks[0].mlp.linear_fc1
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        out, _ = linear(torch.randn(3, 5, model.model_config.dim))
    assert out.dtype == torch.bfloat16
