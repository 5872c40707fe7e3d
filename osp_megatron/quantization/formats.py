"""8-bit number formats used for quantized training: FP8 E4M3, FP8 E5M2 and HiF8.

Each is a ``Format`` whose ``qdq`` rounds an already scaled tensor onto the format (saturating).
"""

from dataclasses import dataclass

import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.quantization import hif8
from osp_megatron.quantization.backends import npu_native_hif8_round
from osp_megatron.quantization.kernels import fused_on_cuda

# The HiF8 recipe of OSP-Next maps the per-tensor amax to these values rather than to the format
# maximum: x and W land where HiF8 has 3 mantissa bits, gradients keep headroom below 2^15.
HIF8_FORWARD_TARGET = 15.0
HIF8_BACKWARD_TARGET = 224.0


@dataclass(frozen=True)
class Format:
    """An 8-bit format: its name, largest finite value and default scaling targets.

    ``forward_target`` (inputs, weights) and ``backward_target`` (output gradients) are the values a
    tensor's amax is scaled to before rounding.
    """

    name: str
    max_value: float
    forward_target: float
    backward_target: float

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of the codes ``encode`` returns: the format's own where torch has it, else one holding it exactly."""
        return torch.bfloat16

    def qdq(
        self,
        x_scaled: torch.Tensor,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Round ``x_scaled`` onto the format (saturating at +-max_value); result in its dtype."""
        raise NotImplementedError

    def scaled_qdq(
        self,
        tensor: torch.Tensor,
        scale: torch.Tensor,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``qdq(tensor * scale) * (1 / scale)`` in ``tensor``'s dtype (float32 arithmetic or wider).

        Dequantization multiplies by the reciprocal, as FP8 GEMMs apply it; unlike a division,
        that is correctly rounded in compiled GPU kernels too, so all devices agree bit for bit.
        """
        work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
        rounded = self.qdq(work * scale, stochastic=stochastic, generator=generator)
        return (rounded * scale.reciprocal()).to(tensor.dtype)

    def encode(self, tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The format's values nearest to ``tensor * scale`` (saturating), stored in ``code_dtype``.

        ``decode(encode(t, s), 1 / s, t.dtype)`` equals ``scaled_qdq(t, s)``: a quantized GEMM keeps the codes
        for its backward, not the dequantized copy. This generic form suits formats whose ``code_dtype``
        holds their values; FP8 and HiF8 override it.
        """
        work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
        return self.qdq(work * scale).to(self.code_dtype)

    @staticmethod
    def decode(codes: torch.Tensor, inverse_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``codes * inverse_scale`` in ``dtype`` (float32 arithmetic or wider, as in ``scaled_qdq``)."""
        return _decode(codes, inverse_scale, dtype)


@fused_on_cuda
def _decode(codes, inverse_scale, dtype: torch.dtype):
    return (codes.to(torch.promote_types(dtype, torch.float32)) * inverse_scale).to(dtype)


@fused_on_cuda
def _fp8_encode(tensor, scale, max_value: float, fp8_dtype: torch.dtype):
    work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    return (work * scale).clamp(-max_value, max_value).to(fp8_dtype)


@fused_on_cuda
def _fp8_scaled_qdq(tensor, scale, inverse_scale, max_value: float, fp8_dtype: torch.dtype):
    work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    rounded = (work * scale).clamp(-max_value, max_value).to(fp8_dtype).to(work.dtype)
    return (rounded * inverse_scale).to(tensor.dtype)


@fused_on_cuda
def _hif8_scaled_qdq(tensor, scale, inverse_scale, random: torch.Tensor | None):
    work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    rounded = hif8.hif8_round_core(work * scale, random, saturate=True)
    return (rounded * inverse_scale).to(tensor.dtype)


@dataclass(frozen=True)
class FP8Format(Format):
    """An IEEE-like FP8 format rounded through the matching ``torch.float8_*`` dtype (nearest-even)."""

    torch_dtype: torch.dtype = torch.float8_e4m3fn

    @property
    def code_dtype(self) -> torch.dtype:
        return self.torch_dtype

    def qdq(self, x_scaled, stochastic=False, generator=None):
        if stochastic:
            raise NotImplementedError(f"stochastic rounding is only implemented for HiF8, not {self.name}")
        # Clamp first: the float8 casts disagree across devices on out-of-range values (NaN, Inf
        # or saturation); training wants saturation.  NaN passes through clamp unchanged.
        clamped = x_scaled.clamp(-self.max_value, self.max_value)
        return clamped.to(self.torch_dtype).to(x_scaled.dtype)

    def scaled_qdq(self, tensor, scale, stochastic=False, generator=None):
        if stochastic:
            raise NotImplementedError(f"stochastic rounding is only implemented for HiF8, not {self.name}")
        return _fp8_scaled_qdq(tensor, scale, scale.reciprocal(), self.max_value, self.torch_dtype)

    def encode(self, tensor, scale):
        return _fp8_encode(tensor, scale, self.max_value, self.torch_dtype)


@dataclass(frozen=True)
class HiF8Format(Format):
    """HiFloat8; nearest rounding with ties away from zero, optionally hybrid stochastic rounding.

    Codes are HiF8 bytes (uint8, hif8_encode / hif8_decode).
    """

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    def qdq(self, x_scaled, stochastic=False, generator=None):
        if stochastic:
            return hif8.hif8_round_stochastic(x_scaled, generator=generator, saturate=True)
        if x_scaled.device.type == "npu":
            native = npu_native_hif8_round(x_scaled.clamp(-self.max_value, self.max_value))
            if native is not None:
                return native
        return hif8.hif8_round(x_scaled, saturate=True)

    def scaled_qdq(self, tensor, scale, stochastic=False, generator=None):
        if tensor.device.type == "npu" and not stochastic:
            return super().scaled_qdq(tensor, scale)
        random = None
        if stochastic:
            random_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            random = torch.rand(tensor.shape, generator=generator, device=tensor.device, dtype=random_dtype)
        return _hif8_scaled_qdq(tensor, scale, scale.reciprocal(), random)

    def encode(self, tensor, scale):
        scaled = tensor.to(torch.promote_types(tensor.dtype, torch.float32)) * scale
        if tensor.device.type == "npu":  # the native cast rounds; encoding its HiF8 values is exact
            scaled = self.qdq(scaled)
        return hif8.hif8_encode(scaled, saturate=True)

    @staticmethod
    def decode(codes, inverse_scale, dtype):
        return _decode(hif8.hif8_decode(codes), inverse_scale, dtype)


E4M3 = FP8Format("e4m3", 448.0, 448.0, 448.0, torch.float8_e4m3fn)
E5M2 = FP8Format("e5m2", 57344.0, 57344.0, 57344.0, torch.float8_e5m2)
HIF8 = HiF8Format("hif8", hif8.HIF8_MAX, HIF8_FORWARD_TARGET, HIF8_BACKWARD_TARGET)

FORMATS = {fmt.name: fmt for fmt in (E4M3, E5M2, HIF8)}


def get_format(name: str, key: str = "format") -> Format:
    """The format called ``name``; ``key`` names the config entry in the error message."""
    if name not in FORMATS:
        raise ConfigError(f"{key}: unknown format {name!r}; allowed: {sorted(FORMATS)}")
    return FORMATS[name]
