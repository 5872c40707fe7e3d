"""One entry point for scaled dot-product attention that picks the best kernel on the device.

Layout everywhere is [batch, tokens, heads, head_dim]; an optional boolean key mask marks real keys. The kernel
rules are in docs/skiparse.md ("Kernels"; "cuDNN or flash-attn-4 on Hopper" for the per-shape measured choice).
"""

import functools
import importlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from osp_megatron.attention import kernel_choice
from osp_megatron.attention.kernel_choice import KernelKey, attention_direction
from osp_megatron.config.errors import ConfigError

# PyTorch's own SDPA kernels that a backend name restricts scaled_dot_product_attention to.
SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("auto", "sdpa", *SDPA_KERNELS, "flash_attn", "flash_attn_4", "npu")
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The kernels between which backend "auto" chooses by measurement on Hopper (kernel_choice), cuDNN the default.
CUDNN, FLASH_ATTN_4 = "cudnn", "flash_attn_4"

# Older PyTorch releases cannot order the allowed kernels and fall back to their built-in order.
_SDPA_KERNEL_TAKES_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters

# PyTorch ships CUDA kernels only for these two; "flash" also has a CPU implementation.
_CUDA_ONLY_SDPA_KERNELS = ("cudnn", "efficient")


class AttentionBackendUnavailableError(ConfigError, RuntimeError):
    """The requested attention backend cannot run here; the message says what to install or use.

    A ConfigError, so that the jobs report it as one line naming the fix (exit status 2) rather than a traceback.
    """


@functools.cache
def _import_flash_attn():
    """flash-attn 2's flash_attn module, or None; cached because a failing import searches the file system each time.

    flash-attn-4 installs only flash_attn/cute/, so `flash_attn` then imports as an empty namespace package:
    without flash-attn 2's functions it counts as absent.
    """
    try:
        module = importlib.import_module("flash_attn")
    except ImportError:
        return None
    has_functions = hasattr(module, "flash_attn_func") and hasattr(module, "flash_attn_varlen_func")
    return module if has_functions else None


@functools.cache
def _import_flash_attn_4():
    """flash-attn-4's flash_attn.cute module (FlashAttention in CuTe DSL), or None."""
    try:
        module = importlib.import_module("flash_attn.cute")
    except ImportError:
        return None
    return module if hasattr(module, "flash_attn_func") else None


@functools.cache
def _import_torch_npu():
    """The torch_npu module, or None."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None


def _require_flash_attn(dtype):
    flash_attn = _import_flash_attn()
    if flash_attn is None:
        raise AttentionBackendUnavailableError(
            "attention backend 'flash_attn' needs the flash-attn package: pip install osp-megatron[gpu]"
        )
    if dtype not in HALF_DTYPES:
        raise ValueError(f"attention backend 'flash_attn' supports float16 and bfloat16 only, got {dtype}")
    return flash_attn


def _flash_attn_4_takes(head_dim):
    """flash-attn-4's head sizes on Hopper; on Blackwell it also refuses 136-248, which its probe then records."""
    return 8 <= head_dim <= 256 and head_dim % 8 == 0


def _require_flash_attn_4(q, v):
    flash_attn_4 = _import_flash_attn_4()
    if flash_attn_4 is None:
        raise AttentionBackendUnavailableError(
            "attention backend 'flash_attn_4' needs the flash-attn-4 package and an NVIDIA GPU of compute "
            "capability 8.0 or newer: pip install 'osp-megatron[fa4]'"
        )
    if q.dtype not in HALF_DTYPES:
        raise ValueError(f"attention backend 'flash_attn_4' supports float16 and bfloat16 only, got {q.dtype}")
    if not (_flash_attn_4_takes(q.shape[-1]) and _flash_attn_4_takes(v.shape[-1])):
        raise ValueError(
            f"attention backend 'flash_attn_4' needs head_dim a multiple of 8 from 8 to 256, got "
            f"{q.shape[-1]} for q and k, {v.shape[-1]} for v"
        )
    return flash_attn_4


def _require_torch_npu():
    torch_npu = _import_torch_npu()
    if torch_npu is None:
        raise AttentionBackendUnavailableError(
            "attention backend 'npu' needs torch_npu and an Ascend NPU: pip install osp-megatron[npu]"
        )
    return torch_npu


def _check_inputs(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k and v must be [batch, tokens, heads, head_dim]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch and heads, "
            f"q and k their head_dim, k and v their token count"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = attendable), got {key_padding_mask.dtype}")
        if (
            key_padding_mask.dim() != 2
            or key_padding_mask.shape[0] not in (1, q.shape[0])
            or (key_padding_mask.shape[1] != k.shape[1])
        ):
            raise ValueError(
                f"key_padding_mask must be [{q.shape[0]} or 1, {k.shape[1]}], got {tuple(key_padding_mask.shape)}"
            )


def _cuda_is_hopper_or_newer(device):
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _sdpa(q, k, v, key_padding_mask, kernels=None):
    """PyTorch SDPA, optionally restricted to `kernels` tried in the given order."""
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kernels is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        priority = {"set_priority": True} if _SDPA_KERNEL_TAKES_PRIORITY else {}
        with sdpa_kernel(kernels, **priority):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2)


def _flash_attn(q, k, v, key_padding_mask):
    """flash-attn; with a mask the real keys are packed and the varlen kernel runs without any mask tensor."""
    flash_attn = _require_flash_attn(q.dtype)
    if key_padding_mask is None:
        return flash_attn.flash_attn_func(q, k, v)
    batch, num_queries = q.shape[:2]
    key_mask = key_padding_mask.expand(batch, -1)
    keys_per_row = key_mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens_k = F.pad(keys_per_row.cumsum(0, dtype=torch.int32), (1, 0))
    cu_seqlens_q = torch.arange(0, (batch + 1) * num_queries, num_queries, dtype=torch.int32, device=q.device)
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(batch * num_queries, *q.shape[2:]),
        k[key_mask],
        v[key_mask],
        cu_seqlens_q,
        cu_seqlens_k,
        num_queries,
        int(keys_per_row.max()),
    )
    return out.reshape(q.shape[:3] + out.shape[-1:])


# CuTe DSL kernels cannot be traced: a torch.compile'd caller runs this call eagerly (one graph break).
@torch.compiler.disable
def _flash_attn_4(q, k, v):
    """flash-attn-4, which returns (out, softmax log-sum-exp)."""
    result = _require_flash_attn_4(q, v).flash_attn_func(q, k, v)
    return result[0] if isinstance(result, tuple) else result


def _npu(q, k, v, key_padding_mask):
    """Ascend fused attention in BSND layout; its atten_mask marks the positions to drop."""
    torch_npu = _require_torch_npu()
    atten_mask = None
    if key_padding_mask is not None:
        atten_mask = (~key_padding_mask)[:, None, None, :].expand(-1, 1, q.shape[1], -1).contiguous()
    return torch_npu.npu_fusion_attention(
        q, k, v, q.shape[2], "BSND", atten_mask=atten_mask, scale=1.0 / math.sqrt(q.shape[-1])
    )[0]


# Efficient and math come last in every list: they accept any head size and mask the fused ones refuse.
_FALLBACK_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _hopper_sdpa(q, k, v):
    """Unmasked SDPA as auto runs it on Hopper or newer: cuDNN first (PyTorch skips it where it cannot run)."""
    # On an H200 cuDNN ran 1.6x faster than SDPA flash unmasked.
    return _sdpa(q, k, v, None, [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, *_FALLBACK_KERNELS])


@torch.compiler.assume_constant_result
def _measured_kernel(batch, q_tokens, k_tokens, heads, head_dim, dtype, direction, device) -> str:
    """CUDNN, or FLASH_ATTN_4 where the probe found it faster for this shape, dtype and direction.

    torch.compile calls this once while tracing a graph (whose shapes it fixes) and keeps the answer as a
    constant, so a compiled caller neither traces the probe nor breaks its graph when cuDNN wins. The arguments
    are plain values: only those pass into such a function.
    """
    key = KernelKey(batch, q_tokens, k_tokens, heads, head_dim, dtype, direction)
    if not kernel_choice.worth_probing(key) or not _flash_attn_4_takes(head_dim) or _import_flash_attn_4() is None:
        return CUDNN
    return kernel_choice.choose_kernel(key, device, {CUDNN: _hopper_sdpa, FLASH_ATTN_4: _flash_attn_4})


def _hopper_unmasked(q, k, v):
    """Unmasked fp16/bf16 attention on Hopper or newer: cuDNN, or flash-attn-4 where measured faster."""
    batch, q_tokens, heads, head_dim = q.shape
    direction = attention_direction(q, k, v)
    if v.shape[-1] == head_dim and (
        _measured_kernel(batch, q_tokens, k.shape[1], heads, head_dim, q.dtype, direction, q.device) == FLASH_ATTN_4
    ):
        return _flash_attn_4(q, k, v)
    return _hopper_sdpa(q, k, v)


def _auto(q, k, v, key_padding_mask):
    device_type = q.device.type
    if device_type == "npu":
        return _npu(q, k, v, key_padding_mask)
    if device_type != "cuda" or q.dtype not in HALF_DTYPES:
        # CPU and full-precision CUDA: PyTorch's own choice already is the fastest correct kernel.
        return _sdpa(q, k, v, key_padding_mask)
    if _cuda_is_hopper_or_newer(q.device):
        if key_padding_mask is None:
            return _hopper_unmasked(q, k, v)
        # Where the PyTorch build lets cuDNN take a mask it ran 3x faster than the efficient kernel on an H200.
        return _sdpa(q, k, v, key_padding_mask, [SDPBackend.CUDNN_ATTENTION, *_FALLBACK_KERNELS])
    if _import_flash_attn() is not None:
        return _flash_attn(q, k, v, key_padding_mask)
    if key_padding_mask is None:
        return _sdpa(q, k, v, None, [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, *_FALLBACK_KERNELS])
    return _sdpa(q, k, v, key_padding_mask, _FALLBACK_KERNELS)


def _attention(q, k, v, key_padding_mask, backend):
    if backend == "auto":
        return _auto(q, k, v, key_padding_mask)
    if backend == "sdpa":
        return _sdpa(q, k, v, key_padding_mask)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, key_padding_mask)
    if backend == "flash_attn_4":
        if key_padding_mask is not None:
            raise ValueError(
                "attention backend 'flash_attn_4' takes no key_padding_mask; use 'auto' or 'flash_attn' with a mask"
            )
        return _flash_attn_4(q, k, v)
    if backend == "npu":
        return _npu(q, k, v, key_padding_mask)
    if backend in _CUDA_ONLY_SDPA_KERNELS and q.device.type != "cuda":
        raise AttentionBackendUnavailableError(
            f"attention backend '{backend}' is a PyTorch CUDA kernel and needs CUDA tensors "
            f"(got {q.device.type}); use backend='auto' or 'math' here"
        )
    return _sdpa(q, k, v, key_padding_mask, [SDPA_KERNELS[backend]])


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def dot_product_attention(q, k, v, key_padding_mask=None, backend="auto"):
    """softmax(q k^T / sqrt(d)) v with q [B, Nq, H, D], k and v [B, Nk, H, D] -> [B, Nq, H, D].

    key_padding_mask: optional bool [B or 1, Nk], True for keys that may be attended to. A batch row
    with no attendable key at all gets a zero output (and zero gradients) instead of NaN.

    backend:
      "auto"        fastest available: on a Hopper-or-newer GPU with fp16/bf16, PyTorch SDPA restricted
                    to cuDNN attention (then flash without a mask, then efficient/math); without a mask,
                    when flash-attn-4 is installed and takes the head_dim, flash-attn-4 instead for the
                    shapes where a probe measured it faster (see below); on older GPUs flash-attn when
                    installed (its varlen kernel over the real keys when masked), else SDPA flash/cuDNN
                    without a mask and efficient/math with one; on an Ascend NPU
                    torch_npu.npu_fusion_attention; otherwise (CPU, float32/float64) PyTorch's own SDPA
                    choice, on CPU its fused CPU kernel or the math path.
      "sdpa"        PyTorch SDPA with its own kernel choice.
      "cudnn", "flash", "efficient", "math"
                    PyTorch SDPA restricted to that one kernel ("cudnn" and "efficient" need CUDA).
      "flash_attn"  the flash-attn package (pip install osp-megatron[gpu]); fp16/bf16 only.
      "flash_attn_4" flash-attn-4, FlashAttention in CuTe DSL (pip install 'osp-megatron[fa4]'); fp16/bf16,
                    head_dim a multiple of 8 from 8 to 256, no key mask.
      "npu"         torch_npu.npu_fusion_attention (pip install osp-megatron[npu]). Written against the
                    documented torch_npu API and not tested on Ascend hardware.
    An explicitly named backend that cannot run here raises AttentionBackendUnavailableError.

    The probe of "auto": the first unmasked call of each (batch, q tokens, k tokens, heads, head_dim, dtype,
    direction) on Hopper, direction "forward" when no gradient can be taken and "forward+backward" otherwise,
    times cuDNN and flash-attn-4 on random tensors of that shape (one untimed call each, then the median of a
    few), keeps the faster for the process and logs both times at INFO (logger
    osp_megatron.attention.kernel_choice). Shapes under kernel_choice.MIN_PROBE_FLOPS forward FLOPs keep cuDNN
    unprobed; a kernel that fails in the probe is logged as a warning and left out for that shape;
    OSP_MEGATRON_ATTENTION_PROBE=0 turns the probe off (cuDNN everywhere). kernel_choice.kernel_decisions()
    lists the choices made, kernel_choice.reset_kernel_decisions() forgets them.
    """
    _check_backend(backend)
    _check_inputs(q, k, v, key_padding_mask)
    if key_padding_mask is None:
        return _attention(q, k, v, None, backend)
    # Fully masked rows would give NaN (0/0); unmask them for the kernel and zero their output instead.
    row_has_key = key_padding_mask.any(dim=1)
    out = _attention(q, k, v, key_padding_mask | ~row_has_key[:, None], backend)
    return out * row_has_key[:, None, None, None].to(out.dtype)


def _segment_bounds(cu_seqlens, name):
    bounds = cu_seqlens.tolist()
    decreasing = any(later < earlier for earlier, later in zip(bounds, bounds[1:]))
    if cu_seqlens.dim() != 1 or not bounds or bounds[0] != 0 or decreasing:
        raise ValueError(f"{name} must be a 1-D non-decreasing offset tensor starting at 0, got {bounds}")
    return bounds


def dot_product_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, backend="auto"):
    """Attention over packed variable-length sequences: q [total_q, H, D], k and v [total_k, H, D].

    Sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1] of
    k and v and attends only inside itself; max_q and max_k are the longest lengths. flash-attn's varlen
    kernel runs when it is installed and the inputs are fp16/bf16 CUDA tensors (or backend="flash_attn");
    otherwise each sequence goes through dot_product_attention with `backend` (correct but slower). A
    sequence without keys gets a zero output.
    """
    _check_backend(backend)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"packed q, k and v must be [total_tokens, heads, head_dim]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} must "
            f"describe the same number of sequences"
        )
    use_flash_attn = backend == "flash_attn" or (
        backend == "auto" and q.is_cuda and q.dtype in HALF_DTYPES and _import_flash_attn() is not None
    )
    if use_flash_attn:
        flash_attn = _require_flash_attn(q.dtype)
        return flash_attn.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), max_q, max_k
        )
    bounds_q = _segment_bounds(cu_seqlens_q, "cu_seqlens_q")
    bounds_k = _segment_bounds(cu_seqlens_k, "cu_seqlens_k")
    if bounds_q[-1] != q.shape[0] or bounds_k[-1] != k.shape[0]:
        raise ValueError(
            f"cu_seqlens end at {bounds_q[-1]} queries and {bounds_k[-1]} keys but q holds {q.shape[0]} "
            f"and k {k.shape[0]}"
        )
    outputs = []
    for q_start, q_end, k_start, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        if q_end == q_start or k_end == k_start:
            outputs.append(q.new_zeros(q_end - q_start, q.shape[1], v.shape[2]))
            continue
        segment = dot_product_attention(
            q[None, q_start:q_end], k[None, k_start:k_end], v[None, k_start:k_end], backend=backend
        )
        outputs.append(segment[0])
    return torch.cat(outputs) if outputs else q.new_zeros(0, q.shape[1], v.shape[2])
