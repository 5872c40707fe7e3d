"""Tests of the attention dispatcher: every backend that runs here against a float64 reference, and its errors.

flash-attn's packing of masked keys is checked on CPU through a stand-in module computing the reference.
"""

import math
import types

import pytest
import torch

from osp_megatron.attention import dispatch
from osp_megatron.attention.dispatch import (
    AttentionBackendUnavailableError,
    dot_product_attention,
    dot_product_attention_varlen,
)

CPU_BACKENDS = ["auto", "sdpa", "math", "flash"]


def reference_attention(q, k, v, key_padding_mask=None):
    """float64 softmax attention on [B, N, H, D]; rows without an attendable key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


def random_tensors(*shapes, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]


def random_key_mask(batch, num_keys, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, num_keys, generator=generator) > 0.4
    mask[:, 0] = True
    return mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_batch", [None, 1, 3])
def test_cpu_backends_match_float64_reference(backend, dtype, mask_batch):
    """Each CPU-capable backend equals float64 attention, without a mask and with a [B or 1, Nk] key mask."""
    q, k, v = random_tensors((3, 7, 2, 16), (3, 11, 2, 16), (3, 11, 2, 16), dtype=dtype)
    mask = None if mask_batch is None else random_key_mask(mask_batch, 11)
    out = dot_product_attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), rtol=tolerance, atol=tolerance)


def test_gradients_match_float64_reference_with_mask():
    """q, k, v gradients through the dispatcher equal those of the float64 reference under a key mask."""
    q, k, v = (t.requires_grad_() for t in random_tensors((2, 5, 3, 8), (2, 9, 3, 8), (2, 9, 3, 8)))
    mask = random_key_mask(2, 9)
    out = dot_product_attention(q, k, v, key_padding_mask=mask)
    expected = reference_attention(q, k, v, mask)
    grad_out = torch.randn_like(out)
    for grad, expected_grad in zip(
        torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out)
    ):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_row_without_keys_gives_zero_output_and_finite_gradients(backend):
    """A batch row whose keys are all masked returns zeros and no NaN anywhere, forward or backward."""
    q, k, v = (t.requires_grad_() for t in random_tensors((2, 4, 2, 8), (2, 6, 2, 8), (2, 6, 2, 8)))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    out = dot_product_attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], reference_attention(q, k, v)[0], rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))


@pytest.mark.skipif(dispatch._import_flash_attn() is not None, reason="flash-attn is installed here")
def test_flash_attn_backend_without_package_names_the_gpu_extra():
    """backend='flash_attn' without flash-attn raises and tells to install osp-megatron[gpu]."""
    q = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(AttentionBackendUnavailableError, match=r"pip install osp-megatron\[gpu\]"):
        dot_product_attention(q, q, q, backend="flash_attn")
    with pytest.raises(AttentionBackendUnavailableError, match=r"osp-megatron\[gpu\]"):
        dot_product_attention_varlen(
            q[0], q[0], q[0], torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4, backend="flash_attn"
        )


@pytest.mark.skipif(dispatch._import_torch_npu() is not None, reason="torch_npu is installed here")
def test_npu_backend_without_package_names_the_npu_extra():
    """backend='npu' without torch_npu raises and tells to install osp-megatron[npu]."""
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(AttentionBackendUnavailableError, match=r"pip install osp-megatron\[npu\]"):
        dot_product_attention(q, q, q, backend="npu")


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_cuda_only_kernels_on_cpu_tensors_raise(backend):
    """PyTorch's CUDA-only SDPA kernels named for CPU tensors raise an error that says CUDA is needed."""
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(AttentionBackendUnavailableError, match="CUDA"):
        dot_product_attention(q, q, q, backend=backend)


def test_unknown_backend_and_bad_shapes_raise_value_errors():
    """An unknown backend name lists the valid ones; mismatched shapes and non-bool masks are refused."""
    q = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="flash_attn"):
        dot_product_attention(q, q, q, backend="fastest")
    with pytest.raises(ValueError, match="batch, tokens, heads, head_dim"):
        dot_product_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share batch and heads"):
        dot_product_attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="bool"):
        dot_product_attention(q, q, q, key_padding_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[2 or 1, 4\]"):
        dot_product_attention(q, q, q, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


def varlen_reference(q, k, v, bounds_q, bounds_k):
    """Packed attention computed sequence by sequence with the float64 reference (zeros where no keys)."""
    outputs = []
    for q_start, q_end, k_start, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        segment = reference_attention(q[None, q_start:q_end], k[None, k_start:k_end], v[None, k_start:k_end])
        outputs.append(segment[0])
    return torch.cat(outputs)


def test_varlen_fallback_equals_per_segment_attention():
    """Without flash-attn, varlen attention equals separate attention on each packed sequence, grads included."""
    bounds_q, bounds_k = [0, 3, 3, 10, 12], [0, 5, 6, 8, 8]
    q, k, v = (t.requires_grad_() for t in random_tensors((12, 2, 8), (8, 2, 8), (8, 2, 8)))
    out = dot_product_attention_varlen(q, k, v, torch.tensor(bounds_q), torch.tensor(bounds_k), 7, 5)
    expected = varlen_reference(q, k, v, bounds_q, bounds_k)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[10:], torch.zeros_like(out[10:]))  # the last sequence has no keys
    grad_out = torch.randn_like(out)
    for grad, expected_grad in zip(
        torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out)
    ):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_varlen_rejects_offsets_that_do_not_fit():
    """Offsets that decrease, do not start at 0 or do not end at the packed length raise ValueError."""
    q = torch.zeros(6, 2, 8)
    for bad in ([0, 4, 3, 6], [1, 3, 6], [0, 3, 5]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            dot_product_attention_varlen(q, q, q, torch.tensor(bad), torch.tensor(bad), 6, 6)


def fake_flash_attn_module(calls):
    """A stand-in for flash_attn with its two entry points computed by the float64 reference."""

    def flash_attn_func(q, k, v):
        calls.append("dense")
        return reference_attention(q, k, v).to(q.dtype)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        calls.append("varlen")
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        lengths_q, lengths_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
        assert max_seqlen_q == lengths_q.max() and max_seqlen_k == lengths_k.max()
        return varlen_reference(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist()).to(q.dtype)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


@pytest.mark.parametrize("mask_batch", [None, 1, 3])
def test_flash_attn_path_packs_masked_keys_correctly(monkeypatch, mask_batch):
    """Through flash-attn the result equals masked attention: with a mask, only the real keys are packed."""
    calls = []
    monkeypatch.setattr(dispatch, "_import_flash_attn", lambda: fake_flash_attn_module(calls))
    q, k, v = random_tensors((3, 5, 2, 8), (3, 9, 2, 8), (3, 9, 2, 8), dtype=torch.bfloat16)
    mask = None if mask_batch is None else random_key_mask(mask_batch, 9)
    out = dot_product_attention(q, k, v, key_padding_mask=mask, backend="flash_attn")
    assert calls == ["dense" if mask is None else "varlen"]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), rtol=2e-2, atol=2e-2)


def test_flash_attn_refuses_full_precision(monkeypatch):
    """flash-attn only takes fp16/bf16; a float32 input names the dtype problem."""
    monkeypatch.setattr(dispatch, "_import_flash_attn", lambda: fake_flash_attn_module([]))
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        dot_product_attention(q, q, q, backend="flash_attn")


CUDA_BACKENDS = ["auto", "sdpa", "cudnn", "flash", "efficient", "math"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_backends_match_float64_reference(backend, masked):
    """Each CUDA SDPA kernel (bf16) matches float64 attention and its gradients; a kernel refusing a mask skips."""
    q, k, v = (t.requires_grad_() for t in random_tensors((2, 300, 4, 64), (2, 257, 4, 64), (2, 257, 4, 64)))
    mask = random_key_mask(2, 257) if masked else None
    device_args = [t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    device_mask = None if mask is None else mask.cuda()
    try:
        out = dot_product_attention(*device_args, key_padding_mask=device_mask, backend=backend)
    except RuntimeError as error:
        if masked and backend in ("cudnn", "flash") and "No available kernel" in str(error):
            pytest.skip(f"PyTorch's {backend} kernel takes no mask here")
        raise
    expected = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=2e-2, atol=2e-2)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, device_args, grad_out.to("cuda", torch.bfloat16))
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_row_without_keys_gives_zero_output():
    """On CUDA in bf16 a fully masked batch row also gives zeros, not NaN."""
    q, k, v = (t.to("cuda", torch.bfloat16) for t in random_tensors((2, 64, 2, 64), (2, 64, 2, 64), (2, 64, 2, 64)))
    mask = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    mask[0] = False
    out = dot_product_attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_every_backend_is_a_valid_model_attention_backend(backend):
    """model.attention_backend takes each dispatcher backend name, flash_attn_4 included, through the config loader."""
    from osp_megatron.config.loader import from_dict
    from osp_megatron.models.config import ModelConfig

    config = from_dict(ModelConfig, {"attention_backend": backend}, "model")
    config.validate()
    assert config.attention_backend == backend
