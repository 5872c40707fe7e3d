"""HiF8 codec against an independent float64 reference built from the format description.

The reference enumerates values from exponent/mantissa rules and assembles codes field by field,
instead of parsing bytes as the implementation does; rounding is brute-force nearest search.
"""

import math

import pytest
import torch

from osp_megatron.quantization.hif8 import (
    hif8_decode,
    hif8_encode,
    hif8_finite_values,
    hif8_round,
    hif8_round_stochastic,
)


def _reference_mantissa_bits(exponent):
    if abs(exponent) <= 3:
        return 3
    if abs(exponent) <= 7:
        return 2
    return 1


def _reference_code_table():
    """code -> value, assembled from (sign, dot, Es, exponent bits, mantissa) per docs/quantization.md."""
    table = {}
    for sign in (0, 1):
        sign_value = -1.0 if sign else 1.0
        for exponent in range(-15, 16):
            magnitude, es = abs(exponent), int(exponent < 0)
            bits = _reference_mantissa_bits(exponent)
            for mantissa in range(2**bits):
                if magnitude >= 8:
                    code = (0b11 << 5) | (es << 4) | ((magnitude - 8) << 1) | mantissa
                elif magnitude >= 4:
                    code = (0b10 << 5) | (es << 4) | ((magnitude - 4) << 2) | mantissa
                elif magnitude >= 2:
                    code = (0b01 << 5) | (es << 4) | ((magnitude - 2) << 3) | mantissa
                elif magnitude == 1:
                    code = (0b001 << 4) | (es << 3) | mantissa
                else:
                    code = (0b0001 << 3) | mantissa
                value = 2.0**exponent * (1 + mantissa / 2**bits)
                if exponent == 15 and mantissa == 1:
                    value = math.inf  # S|11|0|111|1 is the infinity code
                table[(sign << 7) | code] = sign_value * value
        for denormal in range(1, 8):
            table[(sign << 7) | denormal] = sign_value * 2.0 ** (denormal - 23)
    table[0x00] = 0.0
    table[0x80] = math.nan
    return table


REFERENCE = _reference_code_table()
POSITIVE = sorted(v for v in REFERENCE.values() if 0.0 <= v < math.inf)
POSITIVE_T = torch.tensor(POSITIVE, dtype=torch.float64)
CODE_OF = {v: c for c, v in REFERENCE.items() if not math.isnan(v)}


def _reference_round(x: torch.Tensor, saturate: bool = False) -> torch.Tensor:
    """Nearest finite HiF8 value by brute force over all values, ties to the larger magnitude."""
    x = x.to(torch.float64)
    magnitude = x.abs()
    finite = torch.where(torch.isfinite(magnitude), magnitude, 0.0)
    out = torch.empty_like(x)
    for start in range(0, x.numel(), 4096):
        chunk = finite.view(-1)[start : start + 4096]
        distance = (chunk[:, None] - POSITIVE_T[None, :]).abs()
        best = distance.min(dim=1, keepdim=True).values
        # Among equally near values take the last (largest): ties away from zero.
        candidates = torch.where(distance == best, torch.arange(len(POSITIVE)), -1)
        out.view(-1)[start : start + 4096] = POSITIVE_T[candidates.max(dim=1).values]
    out = torch.where(magnitude >= 40960.0, 32768.0 if saturate else math.inf, out)
    out = torch.where(x < 0, -out, out)
    out = torch.where(out == 0, 0.0, out)
    return torch.where(torch.isnan(x), math.nan, out)


def _sample(count: int = 6000, seed: int = 0) -> torch.Tensor:
    """Log-uniform magnitudes over every binade plus every tie point and its float64 neighbours."""
    generator = torch.Generator().manual_seed(seed)
    log2 = torch.rand(count, generator=generator, dtype=torch.float64) * 45 - 28
    random = 2.0**log2
    values = POSITIVE_T
    ties = (values[1:] + values[:-1]) / 2
    up, down = torch.full_like(ties, math.inf), torch.zeros_like(ties)
    specials = torch.tensor(
        [0.0, 2.0**-23, 2.0**-24, 1e-300, 32768.0, 36000.0, 40959.99, 40960.0, 40960.01, 65536.0, 1e300],
        dtype=torch.float64,
    )
    points = torch.cat([random, values, ties, torch.nextafter(ties, up), torch.nextafter(ties, down), specials])
    return torch.cat([points, -points])


def test_all_256_codes_decode_as_the_format_says():
    """Every byte decodes to the value its fields describe; 0x80 is NaN, 0x6F/0xEF are +-Inf."""
    decoded = hif8_decode(torch.arange(256, dtype=torch.uint8)).double()
    for code in range(256):
        expected = REFERENCE[code]
        if math.isnan(expected):
            assert math.isnan(decoded[code].item()), code
        else:
            assert decoded[code].item() == expected, (hex(code), decoded[code].item(), expected)
    assert torch.isnan(decoded).sum() == 1 and torch.isinf(decoded).sum() == 2
    finite = decoded[torch.isfinite(decoded)]
    assert finite.unique().numel() == 253 == finite.numel()
    assert finite.max() == 2.0**15 and finite[finite > 0].min() == 2.0**-22
    assert decoded[0x7E] == 2.0**-15  # min normal
    assert hif8_finite_values().tolist() == sorted(finite.tolist())


def test_encode_decode_round_trip_of_every_finite_code():
    """encode(decode(c)) == c for the 253 finite codes, and the special codes survive too."""
    codes = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(hif8_encode(hif8_decode(codes)), codes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_round_is_nearest_with_ties_away_against_brute_force(dtype):
    """hif8_round equals brute-force nearest (ties away) on a dense sample with all tie points."""
    sample = _sample().to(dtype)
    got = hif8_round(sample)
    assert got.dtype == dtype
    expected = _reference_round(sample.double())
    both_nan = torch.isnan(got.double()) & torch.isnan(expected)
    mismatch = ~((got.double() == expected) | both_nan)
    assert not mismatch.any(), (sample[mismatch][:5], got[mismatch][:5], expected[mismatch][:5])


def test_encode_gives_the_code_of_the_nearest_value():
    """hif8_encode(x) is the reference code of the brute-force nearest value."""
    sample = _sample(count=3000, seed=1)
    expected = _reference_round(sample)
    codes = hif8_encode(sample)
    expected_codes = torch.tensor([CODE_OF[v] for v in expected.tolist()], dtype=torch.uint8)
    assert torch.equal(codes, expected_codes)


def test_special_values_zero_overflow_and_saturation():
    """No -0; |x| < 2^-23 -> 0; 40960 and Inf overflow to Inf, or to 2^15 when saturating; NaN stays."""
    x = torch.tensor([-0.0, -1e-30, 2.0**-23 * 0.999, 2.0**-23, -40959.0, 40960.0, math.inf, -math.inf, math.nan])
    got = hif8_round(x)
    expected = [0.0, 0.0, 0.0, 2.0**-22, -32768.0, math.inf, math.inf, -math.inf]
    assert got[:8].tolist() == expected and torch.isnan(got[8])
    assert not torch.signbit(got[:3]).any()
    saturated = hif8_round(x, saturate=True)
    assert saturated[5:8].tolist() == [32768.0, 32768.0, -32768.0]
    assert hif8_encode(x).tolist() == [0, 0, 0, 1, 0xEE, 0x6F, 0x6F, 0xEF, 0x80]


def test_relative_error_is_bounded_by_band_precision():
    """In the normal range, |round(x) - x| <= 2^-(m+1) |x| with m the mantissa bits of x's binade."""
    generator = torch.Generator().manual_seed(2)
    x = 2.0 ** (torch.rand(50000, generator=generator, dtype=torch.float64) * 30 - 15)
    exponent = torch.floor(torch.log2(x)).long()
    bits = torch.tensor([_reference_mantissa_bits(e) for e in exponent.tolist()], dtype=torch.float64)
    relative = (hif8_round(x) - x).abs() / x
    assert (relative <= 2.0 ** -(bits + 1)).all()
    assert relative[bits == 3].max() > 0.05  # the bound is tight, not vacuous


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    """Hybrid rounding returns one of the two grid neighbours and its mean over draws equals x."""
    values = torch.tensor([0.07, -0.3 / 8, 20.3, -1000.7, 3e-6, 1e-7, 3e-8, 1e-12, 9000.0], dtype=torch.float64)
    draws = 20000
    x = values.repeat(draws, 1)
    rounded = hif8_round_stochastic(x, generator=torch.Generator().manual_seed(3))
    magnitude = values.abs()
    index = torch.searchsorted(POSITIVE_T, magnitude)
    lower, upper = POSITIVE_T[index - 1], POSITIVE_T[index]
    is_neighbour = (rounded.abs() == lower) | (rounded.abs() == upper)
    assert is_neighbour.all()
    assert ((torch.sign(rounded) == torch.sign(values)) | (rounded == 0)).all()
    std = (upper - lower) / 2 / math.sqrt(draws)
    assert ((rounded.mean(dim=0) - values).abs() <= 5 * std).all()


def test_stochastic_rounding_is_nearest_in_the_three_bit_band_and_at_overflow():
    """For 2^-3 <= |x| < 16 and |x| >= 2^15 hybrid rounding is deterministic nearest rounding."""
    generator = torch.Generator().manual_seed(4)
    x = torch.cat([2.0 ** (torch.rand(5000, generator=generator) * 7 - 3), torch.tensor([33000.0, 41000.0])])
    x = torch.cat([x, -x])
    assert torch.equal(hif8_round_stochastic(x, generator=generator), hif8_round(x))
    saturated = hif8_round_stochastic(torch.tensor([41000.0]), saturate=True)
    assert saturated.item() == 32768.0


def test_stochastic_rounding_is_reproducible_with_a_generator():
    """The same generator seed gives the same draws."""
    x = torch.randn(1000) * 1e-3
    first = hif8_round_stochastic(x, generator=torch.Generator().manual_seed(5))
    second = hif8_round_stochastic(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
