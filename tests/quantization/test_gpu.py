"""GPU checks: the HiF8 codec on CUDA matches the CPU, and SM90 FP8 GEMMs match the emulation."""

import warnings

import pytest
import torch
import torch.nn as nn

from osp_megatron.quantization import (
    E4M3,
    E5M2,
    HIF8,
    ModulesConfig,
    QuantConfig,
    TensorScaler,
    apply_quantization,
    hif8_decode,
    hif8_encode,
    hif8_round,
    hif8_round_stochastic,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs CUDA capability >= 9.0 (Hopper) for FP8 GEMMs",
)
ALL_LINEARS = ModulesConfig(include=["*"], exclude=[])


@pytest.mark.gpu
@needs_cuda
def test_hif8_codec_on_cuda_equals_cpu():
    """hif8_round / encode / decode give bit-identical results on CUDA and CPU, for every dtype."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=generator) * 2.0 ** (torch.randint(-26, 18, (1 << 16,), generator=generator))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sample = x.to(dtype)
        assert torch.equal(hif8_round(sample.cuda()).cpu(), hif8_round(sample))
    assert torch.equal(hif8_encode(x.cuda()).cpu(), hif8_encode(x))
    codes = torch.arange(256, dtype=torch.uint8)
    decoded_gpu, decoded_cpu = hif8_decode(codes.cuda()).cpu(), hif8_decode(codes)
    assert torch.allclose(decoded_gpu, decoded_cpu, rtol=0, atol=0, equal_nan=True)
    stochastic = hif8_round_stochastic(x.cuda())
    assert torch.equal(hif8_round(stochastic).cpu(), stochastic.cpu())  # results are HiF8 values


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", [HIF8, E4M3, E5M2])
def test_fused_scaled_qdq_on_cuda_equals_cpu(fmt):
    """The compiled quantize-dequantize kernels on CUDA are bit-identical to eager CPU arithmetic."""
    x = torch.randn(4097, 33, generator=torch.Generator().manual_seed(1)) * 3
    scale = torch.tensor(fmt.forward_target) / x.abs().max()
    for dtype in (torch.float32, torch.bfloat16):
        tensor = x.to(dtype)
        on_gpu, on_cpu = fmt.scaled_qdq(tensor.cuda(), scale.cuda()).cpu(), fmt.scaled_qdq(tensor, scale)
        differ = on_gpu != on_cpu
        assert not differ.any(), (dtype, int(differ.sum()), tensor[differ][:3], on_gpu[differ][:3], on_cpu[differ][:3])


def _pair(backend, dtype, shape=(64, 128, 96)):
    tokens, in_features, out_features = shape
    torch.manual_seed(1)
    layer = nn.Linear(in_features, out_features).cuda().to(dtype)
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    upstream = torch.randn(tokens, out_features, device="cuda", dtype=dtype)
    apply_quantization(layer, QuantConfig(recipe="fp8_hybrid", backend=backend, select="all", modules=ALL_LINEARS))
    x.requires_grad_(True)
    y = layer(x)
    y.backward(upstream)
    return y.detach().float(), x.grad.float(), layer.weight.grad.float(), layer.bias.grad.float()


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_matches_emulation(dtype, monkeypatch):
    """The torch._scaled_mm path (all three GEMMs in FP8) equals the quantize-dequantize emulation."""
    calls = []
    real_scaled_mm = torch._scaled_mm

    def counting_scaled_mm(*args, **kwargs):
        calls.append(args[0].dtype)
        return real_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting_scaled_mm)
    fast = _pair("scaled_mm", dtype)
    assert calls == [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e5m2]
    emulated = _pair("emulate", dtype)
    # FP8 tensor-core accumulation and bf16 outputs differ from the emulated GEMM in the last bits;
    # both are far below the quantization error itself (~1e-2).
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    for name, fast_tensor, emulated_tensor in zip(("y", "dx", "dW", "db"), fast, emulated):
        error = (fast_tensor - emulated_tensor).norm() / emulated_tensor.norm()
        assert error < tolerance, (name, error.item())


@pytest.mark.gpu
@needs_sm90
def test_scaled_mm_falls_back_to_emulation_for_unaligned_shapes():
    """Dimensions that are not multiples of 16 run emulated (with a warning) and still match it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = _pair("scaled_mm", torch.float32, shape=(10, 24, 40))
    assert any("emulating this layer" in str(w.message) for w in caught)
    emulated = _pair("emulate", torch.float32, shape=(10, 24, 40))
    for fast_tensor, emulated_tensor in zip(fast, emulated):
        torch.testing.assert_close(fast_tensor, emulated_tensor, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_fused_current_scaling_encode_on_cuda_equals_cpu(fmt):
    """The compiled one-pass encode (amax, scale, cast, transpose) agrees with the separate eager passes on the CPU."""
    x = torch.randn(4096, 320, generator=torch.Generator().manual_seed(2)) * 7
    for dtype in (torch.float32, torch.bfloat16):
        tensor = x.to(dtype)
        on_gpu, on_cpu = TensorScaler(fmt, fmt.forward_target), TensorScaler(fmt, fmt.forward_target)
        assert on_gpu._fusable(tensor.cuda(), None)
        codes, codes_t, inverse = on_gpu.encode_transposed(tensor.cuda())
        expected, expected_inverse = on_cpu.encode(tensor)
        torch.testing.assert_close(inverse.cpu(), expected_inverse, rtol=1e-6, atol=0)
        # A scale one ulp apart (compiled division) may move a value sitting on a rounding boundary.
        assert (codes.cpu().float() != expected.float()).float().mean() < 1e-4
        assert torch.equal(codes_t.cpu().float(), codes.cpu().t().float())


@pytest.mark.gpu
@needs_sm90
def test_measured_selection_on_the_device():
    """quant.select measured times each shape once on the GPU, records both times, and either path trains."""
    from osp_megatron.quantization import selection

    selection.reset_decisions()
    layer = nn.Linear(2048, 4096).cuda().to(torch.bfloat16)
    apply_quantization(layer, QuantConfig(recipe="fp8_hybrid", modules=ALL_LINEARS))
    for tokens in (8192, 64, 8192):
        x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        out.float().square().mean().backward()
        reference = x.detach() @ layer.weight.detach().t() + layer.bias.detach()
        assert ((out.detach() - reference).float().norm() / reference.float().norm()) < 0.1
    made = selection.decisions()
    assert [d.shape.tokens for d in made] == [8192, 64]
    assert all(d.bf16_ms > 0 and d.fp8_ms > 0 for d in made)
    assert len(selection.new_decisions()) == 2
    selection.reset_decisions()
