"""HiFloat8 (HiF8) codec: encode, decode, round-to-nearest and hybrid stochastic rounding.

Vectorised torch code that runs on any device; the bit layout is in docs/quantization.md.

Format as implemented (per sign; E is the unbiased binary exponent, m the mantissa bits):

    dot   |E| range   layout after the dot              m   values
    11    8..15       Es, 3 bits (|E| - 8), 1 mantissa  1   2^E * (1 + k/2)
    10    4..7        Es, 2 bits (|E| - 4), 2 mantissa  2   2^E * (1 + k/4)
    01    2..3        Es, 1 bit  (|E| - 2), 3 mantissa  3   2^E * (1 + k/8)
    001   1           Es, 3 mantissa                    3   2^E * (1 + k/8)
    0001  0           3 mantissa                        3   1 + k/8
    0000  denormal    3-bit M                           -   2^(M - 23), M = 1..7

Es = 1 means a negative exponent.  Special codes: 0x00 is zero (the only zero), 0x80 is NaN.
Decision on the ambiguous point: the pattern S|11|0|111|1 (0x6F / 0xEF) would read as
+-1.5 * 2^15 by the table, but it is reserved for +-Inf, so the largest finite value is
2^15 (0x6E) and 1.5 * 2^15 does not exist.  Hence 253 finite values, 2 infinities, 1 NaN.

Rounding (``hif8_round``): nearest representable value, ties away from zero, on the linear
scale; so |x| < 2^-23 gives 0 (never -0), |x| >= 40960 (the midpoint of 2^15 and the missing
1.5 * 2^15) overflows to Inf, or to 2^15 when saturating; NaN stays NaN.

Hybrid rounding (``hif8_round_stochastic``, for gradients): stochastic rounding in every band
with fewer than 3 mantissa bits, i.e. |x| < 2^-3 (E <= -4: the 2- and 1-bit bands, the denormals
and everything below the smallest denormal) and 16 <= |x| < 2^15 (4 <= E <= 14); nearest rounding
in the 3-bit band 2^-3 <= |x| < 16 and for |x| >= 2^15 (the E = 15 binade holds only 2^15, so the
overflow rule above applies).  Why: gradients scaled to amax = 224 put most elements in the coarse
bands below 2^-3, where nearest rounding has up to 12.5-50 % relative error that is correlated
with magnitude and flushes the tail to zero, which biases the accumulated weight gradient;
stochastic rounding makes every element unbiased.  In the 3-bit band nearest rounding is already
within 6.25 % and adds no variance.
"""

import math

import torch

from osp_megatron.quantization.kernels import fused_on_cuda

HIF8_MAX = 2.0**15
HIF8_MIN_NORMAL = 2.0**-15
HIF8_MIN_DENORMAL = 2.0**-22
HIF8_OVERFLOW_THRESHOLD = 1.25 * 2.0**15  # midpoint between 2^15 and the reserved 1.5 * 2^15
HIF8_ZERO_THRESHOLD = 2.0**-23  # midpoint between 0 and the smallest denormal
HIF8_NAN_CODE = 0x80
HIF8_POS_INF_CODE = 0x6F
HIF8_NEG_INF_CODE = 0xEF

# Rounding happens on a per-binade grid; binades below the smallest denormal share its grid.
_LOWEST_BINADE = -22
_HIGHEST_BINADE = 15


def _decode_byte(code: int) -> float:
    """Value of one HiF8 byte, parsed field by field from the layout in the module docstring."""
    negative = bool(code & 0x80)
    body = code & 0x7F
    if code == HIF8_NAN_CODE:
        return math.nan
    if body == HIF8_POS_INF_CODE:
        return -math.inf if negative else math.inf
    if body >> 5 == 0b11:
        exponent_negative, magnitude = (body >> 4) & 1, 8 + ((body >> 1) & 0b111)
        mantissa, mantissa_bits = body & 0b1, 1
    elif body >> 5 == 0b10:
        exponent_negative, magnitude = (body >> 4) & 1, 4 + ((body >> 2) & 0b11)
        mantissa, mantissa_bits = body & 0b11, 2
    elif body >> 5 == 0b01:
        exponent_negative, magnitude = (body >> 4) & 1, 2 + ((body >> 3) & 0b1)
        mantissa, mantissa_bits = body & 0b111, 3
    elif body >> 4 == 0b001:
        exponent_negative, magnitude = (body >> 3) & 1, 1
        mantissa, mantissa_bits = body & 0b111, 3
    elif body >> 3 == 0b0001:
        exponent_negative, magnitude = 0, 0
        mantissa, mantissa_bits = body & 0b111, 3
    else:
        denormal = body & 0b111
        if denormal == 0:
            return 0.0
        value = 2.0 ** (denormal - 23)
        return -value if negative else value
    exponent = -magnitude if exponent_negative else magnitude
    value = 2.0**exponent * (1.0 + mantissa / 2**mantissa_bits)
    return -value if negative else value


_DECODE_LIST = [_decode_byte(code) for code in range(256)]
# Finite non-negative values in increasing order with their codes; encoding is a sorted lookup.
_POSITIVE = sorted((value, code) for code, value in enumerate(_DECODE_LIST) if 0.0 <= value < math.inf)
_POSITIVE_VALUES = [value for value, _ in _POSITIVE]
_POSITIVE_CODES = [code for _, code in _POSITIVE]

_table_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def _table(name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A constant lookup table on the requested device, built once per (device, dtype)."""
    key = (name, device, dtype)
    if key not in _table_cache:
        values = {"decode": _DECODE_LIST, "positive_values": _POSITIVE_VALUES, "positive_codes": _POSITIVE_CODES}
        _table_cache[key] = torch.tensor(values[name], dtype=dtype, device=device)
    return _table_cache[key]


def _check_floating(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"HiF8 rounding needs a floating-point tensor, got {x.dtype}")


def hif8_stochastic_band_mask(magnitude: torch.Tensor) -> torch.Tensor:
    """True where hybrid rounding is stochastic: bands with fewer than 3 mantissa bits, below 2^15."""
    return ((magnitude >= 16.0) | (magnitude < 0.125)) & (magnitude < HIF8_MAX)


def hif8_round_core(x: torch.Tensor, random: torch.Tensor | None, saturate: bool) -> torch.Tensor:
    """Round every element of x to HiF8 in x's dtype; ``random`` in [0, 1) enables hybrid rounding.

    Only elementwise exact operations, so a compiler may fuse them without changing any result.
    """
    if x.dtype == torch.float64:  # keep float64 input in float64 so nothing is rounded twice
        compute, bits, mantissa_width, bias = torch.float64, torch.int64, 52, 1023
    else:  # float32 holds every bf16/fp16 value exactly
        compute, bits, mantissa_width, bias = torch.float32, torch.int32, 23, 127
    magnitude = x.to(compute).abs()
    finite = torch.where(torch.isfinite(magnitude), magnitude, 0.0)
    # Binade E = floor(log2 |x|) read from the exponent field; zero and float subnormals read as
    # very negative and, like everything below 2^-22, share the grid of the smallest denormal.
    binade = ((finite.view(bits) >> mantissa_width) - bias).clamp(_LOWEST_BINADE, _HIGHEST_BINADE)
    width = binade.abs()
    mantissa_bits = torch.where(
        binade < -15,
        torch.zeros_like(binade),
        torch.where(width <= 3, 3, torch.where(width <= 7, 2, 1)).to(bits),
    )
    quantum_exponent = binade - mantissa_bits
    # 2^k built from its exponent field; multiplying by powers of two is exact.
    quantum = ((quantum_exponent + bias) << mantissa_width).view(compute)
    inverse_quantum = ((bias - quantum_exponent) << mantissa_width).view(compute)
    in_steps = finite * inverse_quantum
    lower = torch.floor(in_steps)
    fraction = in_steps - lower
    round_up = fraction >= 0.5
    if random is not None:
        round_up = torch.where(hif8_stochastic_band_mask(finite), random < fraction, round_up)
    # Stepping up from the top of a binade lands on the next power of two, which is representable.
    rounded = (lower + round_up.to(compute)) * quantum
    rounded = torch.where(magnitude >= HIF8_OVERFLOW_THRESHOLD, HIF8_MAX if saturate else math.inf, rounded)
    signed = torch.where(x < 0, -rounded, rounded)
    # Negative values that round to zero must give +0: the format has no -0.
    signed = torch.where(rounded == 0, torch.zeros_like(signed), signed)
    return torch.where(torch.isnan(x), math.nan, signed).to(x.dtype)


_fused_round = fused_on_cuda(hif8_round_core)


def hif8_round(x: torch.Tensor, saturate: bool = False) -> torch.Tensor:
    """Nearest HiF8 value of every element (ties away from zero), in x's dtype.

    Overflow (|x| >= 40960, including Inf) gives +-Inf, or +-2^15 when ``saturate``; NaN stays NaN.
    """
    _check_floating(x)
    return _fused_round(x, None, saturate)


def hif8_round_stochastic(
    x: torch.Tensor, generator: torch.Generator | None = None, saturate: bool = False
) -> torch.Tensor:
    """Hybrid rounding to HiF8: stochastic in the low-precision bands, nearest elsewhere.

    In a stochastic band, x between grid neighbours lo < x < hi becomes hi with probability
    (x - lo) / (hi - lo), so the expectation equals x.  See the module docstring for the bands.
    """
    _check_floating(x)
    random_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    random = torch.rand(x.shape, generator=generator, device=x.device, dtype=random_dtype)
    return _fused_round(x, random, saturate)


def hif8_encode(x: torch.Tensor, saturate: bool = False) -> torch.Tensor:
    """HiF8 byte (uint8) of the nearest HiF8 value of every element; see ``hif8_round``."""
    _check_floating(x)
    rounded = hif8_round(x if x.dtype == torch.float64 else x.to(torch.float32), saturate=saturate)
    magnitude = rounded.abs()
    values = _table("positive_values", x.device, rounded.dtype)
    codes = _table("positive_codes", x.device, torch.int64)
    index = torch.searchsorted(values, magnitude.contiguous()).clamp(max=len(_POSITIVE_CODES) - 1)
    code = codes[index]
    code = torch.where(torch.isinf(magnitude), HIF8_POS_INF_CODE, code)
    code = torch.where(rounded < 0, code | 0x80, code)
    code = torch.where(torch.isnan(rounded), HIF8_NAN_CODE, code)
    return code.to(torch.uint8)


def hif8_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 value of every HiF8 byte (a uint8 tensor)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"hif8_decode needs a uint8 tensor, got {codes.dtype}")
    return _table("decode", codes.device, torch.float32)[codes.to(torch.int64)]


def hif8_finite_values() -> torch.Tensor:
    """All 253 finite HiF8 values in increasing order (float64, on the CPU)."""
    values = sorted(v for v in _DECODE_LIST if math.isfinite(v))
    return torch.tensor(values, dtype=torch.float64)
