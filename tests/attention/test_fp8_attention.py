"""FP8 attention: scale bookkeeping, the quant.attention wiring and, on SM90 GPUs, cuDNN's FP8 kernels
against a float64 reference and a short training run against bf16."""

import math

import pytest
import torch

from osp_megatron.attention.dispatch import dot_product_attention
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.state import ensure_single_rank_group
from osp_megatron.quantization import (
    QuantConfig,
    apply_quantization,
    load_quantization_state_dict,
    quantization_state_dict,
    quantized_autocast,
    remove_quantization,
)
from osp_megatron.quantization.attention import attention_kernel, quantized_attention_modules
from osp_megatron.quantization.fp8_attention import (
    FP8AttentionState,
    fp8_attention_supported,
    fp8_dot_product_attention,
    gradient_product_descale,
    quantization_scales,
)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    ensure_single_rank_group()


def quant(**fields):
    return from_dict(QuantConfig, fields, "quant")


def tiny_model(**fields):
    config = from_dict(ModelConfig, {"preset": "tiny", "sparse_ratio": 2, "full_blocks": 1, **fields}, "model")
    return build_model(config)


def test_quantization_scales_map_amax_to_the_format_maximum():
    scale, descale = quantization_scales(torch.tensor([2.0, 0.0]), 448.0)
    assert scale[0] == 224.0 and descale[0] == 2.0 / 448.0
    assert torch.isfinite(scale[1]) and scale[1] > 0  # an all-zero tensor still gets a usable scale
    scale, descale = gradient_product_descale(torch.tensor(0.5), torch.tensor(3.0), 128, 57344.0)
    assert math.isclose(float(descale), 0.5 * 3.0 * 128 / 57344.0, rel_tol=1e-6)
    assert math.isclose(float(scale * descale), 1.0, rel_tol=1e-6)


def test_gradient_state_keeps_the_maximum_of_its_history_with_headroom():
    state = FP8AttentionState(history_len=2, margin=1)
    assert state.scales(57344.0, "cpu") is None  # nothing recorded: the first backward calibrates
    state.record(torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(state.scales(57344.0, "cpu"), 57344.0 / torch.tensor([2.0, 4.0, 8.0]))
    state.record(torch.tensor([8.0, 1.0, float("inf")]))  # a non-finite amax records as "no information"
    torch.testing.assert_close(state.scales(57344.0, "cpu"), 57344.0 / torch.tensor([16.0, 4.0, 8.0]))
    state.record(torch.tensor([1.0, 1.0, 1.0]))  # the oldest entry leaves the two-call history
    torch.testing.assert_close(state.scales(57344.0, "cpu"), 57344.0 / torch.tensor([16.0, 2.0, 2.0]))
    longer = FP8AttentionState(history_len=5)
    longer.load_state_dict(state.state_dict())
    assert longer.amax_history.shape == (5, 3)
    torch.testing.assert_close(longer.amax_history.amax(0), state.amax_history.amax(0))


def test_without_an_fp8_device_the_16_bit_kernel_runs():
    q, k, v = (torch.randn(2, 12, 2, 8, dtype=torch.float64) for _ in range(3))
    assert not fp8_attention_supported(q)
    torch.testing.assert_close(fp8_dot_product_attention(q, k, v), dot_product_attention(q, k, v), rtol=0, atol=0)
    with pytest.raises(ValueError, match="gradient_format"):
        fp8_dot_product_attention(q, k, v, gradient_format="e5m2")


def test_attention_needs_an_fp8_recipe():
    quant(recipe="fp8_hybrid", attention=True).validate()
    for recipe in ("hif8", "none"):
        with pytest.raises(ConfigError, match="quant.attention"):
            quant(recipe=recipe, attention=True).validate()
    with pytest.raises(ConfigError, match="quant.attention"):
        quant(recipe="fp8_hybrid", attention="yes").validate()


def test_apply_quantization_puts_fp8_attention_on_self_attention_cores_only():
    model = tiny_model()
    names = apply_quantization(model, quant(recipe="fp8_hybrid", attention=True))
    cores = sorted(quantized_attention_modules(model))
    assert cores and all(name.endswith("self_attention.core_attention") for name in cores)
    assert set(cores) <= set(names)
    assert not any("cross_attention" in name for name in cores)
    core = model.get_submodule(cores[0])
    assert attention_kernel(core) is not None
    with quantized_autocast(enabled=False):
        assert attention_kernel(core) is None
    state = quantization_state_dict(model)
    assert state[cores[0]]["fp8_attention"]["amax_history"] is None
    quantized_attention_modules(model)[cores[0]].fp8.record(torch.tensor([1.0, 2.0, 3.0]))
    saved = quantization_state_dict(model)
    other = tiny_model()
    apply_quantization(other, quant(recipe="fp8_hybrid", attention=True))
    load_quantization_state_dict(other, saved)
    torch.testing.assert_close(
        quantized_attention_modules(other)[cores[0]].fp8.amax_history,
        quantized_attention_modules(model)[cores[0]].fp8.amax_history,
    )
    assert set(remove_quantization(model)) >= set(cores)
    assert not quantized_attention_modules(model) and attention_kernel(core) is None
    plain = tiny_model()
    apply_quantization(plain, quant(recipe="fp8_hybrid"))
    assert not quantized_attention_modules(plain)


def test_fp8_attention_setting_leaves_the_cpu_model_unchanged():
    """On the CPU quant.attention is a no-op: the same output as the model quantizing its linears only."""
    torch.manual_seed(0)
    model = tiny_model()
    x, t, text = torch.randn(1, 16, 2, 8, 8), torch.tensor([10.0]), torch.randn(1, 32, 32)
    apply_quantization(model, quant(recipe="fp8_hybrid"))
    expected = model(x, t, text)
    apply_quantization(model, quant(recipe="fp8_hybrid", attention=True))
    torch.testing.assert_close(model(x, t, text), expected, rtol=0, atol=0)


needs_fp8_attention = pytest.mark.skipif(
    not torch.cuda.is_available() or not fp8_attention_supported(torch.empty(1, device="cuda", dtype=torch.bfloat16)),
    reason="needs an SM90+ GPU and nvidia-cudnn-frontend",
)


def relative_error(value, reference):
    return float((value.double() - reference).norm() / reference.norm())


@pytest.mark.gpu
@needs_fp8_attention
@pytest.mark.parametrize("batch,tokens", [(1, 2048), (4, 512)])
def test_cudnn_fp8_attention_matches_float64_reference(batch, tokens):
    """Output within E4M3 error and gradients within E5M2 error of exact attention; no gradient saturates."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, 4, 128, device="cuda", generator=generator) for _ in range(3))
    grad = torch.randn(batch, tokens, 4, 128, device="cuda", generator=generator)
    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    reference = dot_product_attention(*exact, backend="math")
    reference_grads = torch.autograd.grad(reference, exact, grad.double())
    inputs = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    state = FP8AttentionState()
    for _ in range(2):  # the first backward calibrates the gradient scales, the second uses the history
        out = fp8_dot_product_attention(*inputs, state=state)
        grads = torch.autograd.grad(out, inputs, grad.bfloat16())
    assert relative_error(out, reference) < 0.08
    for value, expected in zip(grads, reference_grads):
        assert relative_error(value, expected) < 0.15
    assert state.reruns == 0
    bf16 = dot_product_attention(*inputs)
    assert relative_error(bf16, reference) < 0.01  # the 16-bit kernel, for scale


@pytest.mark.gpu
@needs_fp8_attention
def test_training_with_fp8_attention_tracks_bf16():
    """A head-dim-128 hybrid DiT trained 40 steps with FP8 linears and attention ends within 5 % of bf16."""
    config = from_dict(
        ModelConfig,
        {
            "preset": "tiny",
            "dim": 256,
            "num_heads": 2,
            "ffn_dim": 512,
            "sparse_ratio": 2,
            "full_blocks": 1,
            "num_layers": 3,
        },
        "model",
    )
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 16, 4, 32, 32, device="cuda", generator=generator, dtype=torch.bfloat16)
    target = torch.randn(2, 16, 4, 32, 32, device="cuda", generator=generator, dtype=torch.bfloat16)
    text = torch.randn(2, 32, 32, device="cuda", generator=generator, dtype=torch.bfloat16)
    t = torch.tensor([300.0, 700.0], device="cuda")

    def train(quantized):
        torch.manual_seed(0)
        model = build_model(config).cuda().bfloat16()
        if quantized:
            apply_quantization(model, quant(recipe="fp8_hybrid", attention=True))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses = []
        for _ in range(40):
            loss = (model(x, t, text).float() - target.float()).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return sum(losses[-5:]) / 5, model

    bf16_loss, _ = train(False)
    fp8_loss, model = train(True)
    states = quantized_attention_modules(model)
    assert states and all(state.fp8.amax_history is not None for state in states.values())  # FP8 ran
    assert abs(fp8_loss - bf16_loss) / bf16_loss < 0.05, (fp8_loss, bf16_loss)
