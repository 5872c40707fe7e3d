"""The hybrid full/Skiparse DiT: equal to the same weights run with explicit dense attention masks."""

from dataclasses import dataclass

import pytest
import torch

from osp_megatron.attention.context import AttentionContext
from osp_megatron.attention.skiparse import skiparse_dense_mask
from osp_megatron.config.loader import from_dict
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.models.wan.spec import wan_layer_spec
from osp_megatron.parallel.layout import LocalTokenLayout
from osp_megatron.parallel.state import ensure_single_rank_group
from osp_megatron.utils import compile as compile_module


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    ensure_single_rank_group()


@dataclass
class MaskedContext(AttentionContext):
    dense_mask: torch.Tensor = None


class DenseMaskLayout(LocalTokenLayout):
    """Reference: tokens never leave row-major order; a sparse block gets its [N, N] Skiparse mask."""

    def enter(self, x, kind):
        return x

    def switch(self, x, from_kind, to_kind):
        return x

    def exit(self, x, kind):
        return x

    def rope(self, kind):
        return self._full_rope

    def attention_context(self, kind):
        mask = None if kind == "full" else skiparse_dense_mask(self.grid, self.ratio, kind)
        return MaskedContext(dense_mask=mask)


class DenseMaskCore(torch.nn.Module):
    def __init__(self, config, **kwargs):
        super().__init__()

    def forward(self, q, k, v, context):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        if context.dense_mask is not None:
            scores = scores.masked_fill(~context.dense_mask, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def hybrid_config(**fields):
    return from_dict(ModelConfig, {"preset": "tiny", "sparse_ratio": 2, "full_blocks": 1, **fields}, "model")


def model_and_masked_reference(config):
    """The model with random weights, and the same weights run row-major with dense masks."""
    torch.manual_seed(0)
    model = build_model(config)
    reference = build_model(
        config, layer_spec=wan_layer_spec(self_attention_core=DenseMaskCore), layout_factory=DenseMaskLayout
    )
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.1)
    reference.load_state_dict(model.state_dict())
    return model, reference


@pytest.mark.parametrize("latent_shape", [(3, 16, 16), (2, 10, 12), (1, 6, 18)])
@pytest.mark.parametrize("layout", [None, ["token", "group", "group", "full", "token"]])
def test_hybrid_model_equals_explicit_mask_reference(latent_shape, layout):
    """Forward and input gradients of the sparse-layout model equal the row-major model with dense masks,
    on grids with and without padding and with consecutive sparse blocks of equal and different patterns."""
    fields = {} if layout is None else {"num_layers": len(layout), "block_layout": layout}
    config = hybrid_config(**fields)
    model, reference = model_and_masked_reference(config)
    latents = torch.randn(2, 16, *latent_shape, requires_grad=True)
    latents_ref = latents.detach().clone().requires_grad_(True)
    timestep, text = torch.tensor([50.0, 700.0]), torch.randn(2, 32, 32)
    out, expected = model(latents, timestep, text), reference(latents_ref, timestep, text)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert torch.allclose(latents.grad, latents_ref.grad, rtol=1e-4, atol=1e-5)


def test_sparse_model_differs_from_full_model():
    """Sanity: the sparse layout changes the function (so the equality above is not vacuous)."""
    torch.manual_seed(0)
    sparse, full = build_model(hybrid_config()), build_model(hybrid_config(sparse_ratio=1))
    for param in sparse.parameters():
        torch.nn.init.normal_(param, std=0.1)
    full.load_state_dict(sparse.state_dict())  # full-attention weights load into a sparse model and back
    latents, timestep, text = torch.randn(1, 16, 2, 8, 8), torch.tensor([100.0]), torch.randn(1, 32, 32)
    assert not torch.allclose(sparse(latents, timestep, text), full(latents, timestep, text), atol=1e-4)


@pytest.mark.parametrize("grid", [(2, 8, 8), (3, 5, 7)])
def test_layout_round_trips_are_identities(grid):
    """enter/exit and token<->group switches return the original hidden states exactly."""
    layout = LocalTokenLayout(grid, 2, 16, 10000.0, "cpu")
    x = torch.randn(2, grid[0] * grid[1] * grid[2], 8)
    for kind in ("full", "token", "group"):
        assert torch.equal(layout.exit(layout.enter(x, kind), kind), x)
    token = layout.enter(x, "token")
    assert torch.equal(layout.switch(layout.switch(token, "token", "group"), "group", "token"), token)
    assert torch.equal(layout.switch(token, "token", "group"), layout.enter(x, "group"))
    assert torch.equal(layout.exit(layout.switch(token, "token", "full"), "full"), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("latent_shape", [(3, 16, 16), (2, 10, 12)])
def test_compiled_cuda_model_equals_eager_and_cpu_reference(latent_shape, monkeypatch):
    """On CUDA the element-wise pieces and layout moves run compiled (fused bias, norms, residuals, packed
    layout gathers). Output and every gradient equal the same model run eagerly on CUDA, and output and
    input gradients equal the eager CPU model with dense masks (float32)."""

    layout = ["full", "token", "group", "token", "full"]
    config = hybrid_config(num_layers=len(layout), block_layout=layout)
    model, reference = model_and_masked_reference(config)
    model = model.cuda()
    latents = torch.randn(2, 16, *latent_shape)
    timestep, text = torch.tensor([50.0, 700.0]), torch.randn(2, 32, 32)

    def run(module, device):
        module.zero_grad(set_to_none=True)
        x = latents.to(device).requires_grad_(True)
        out = module(x, timestep.to(device), text.to(device))
        out.square().sum().backward()
        return out.detach().cpu(), x.grad.cpu(), {n: p.grad.cpu() for n, p in module.named_parameters()}

    compiled = run(model, "cuda")
    monkeypatch.setattr(compile_module, "_COMPILE", "0")
    eager = run(model, "cuda")
    expected = run(reference, "cpu")
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
    for name, grad in compiled[2].items():
        torch.testing.assert_close(grad, eager[2][name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(compiled[0], expected[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(compiled[1], expected[1], rtol=1e-3, atol=1e-4)
