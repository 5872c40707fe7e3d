"""Which GEMM shapes run in FP8: measured once per shape on the device, so that FP8 is never slower than bf16.

An FP8 GEMM pays for passes of its own (amax, scale, cast of x and W, and in the backward of the output gradient
plus the transposes the wgrad GEMM needs); below some size they cost more than the faster tensor-core GEMM saves.
With ``quant.select: measured`` the first call of each shape (tokens x in -> out, training or inference form,
output dtype) times both the bf16 and the FP8 version of that GEMM on tensors of that shape and keeps the faster;
the decision is cached for the process and reported once (``new_decisions``). Ranks that share an amax reduction
group add their timings up first, so they all take the same path (the FP8 path all-reduces amaxes in it).
"""

import dataclasses
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F

from osp_megatron.quantization.gemm import (
    QuantizedLinearFunction,
    inference_gemm,
    prepare_inference_weight,
    shared_input,
)
from osp_megatron.utils.timing import median_cuda_ms as _elapsed_ms
from osp_megatron.utils.timing import outside_saved_tensor_hooks

WARMUP_CALLS = 1  # the first call of a shape compiles the fused quantization kernels: never timed
TIMED_CALLS = 3  # the median counts


@dataclasses.dataclass(frozen=True)
class GemmShape:
    """One GEMM a quantized linear runs: ``tokens x in_features -> out_features``."""

    tokens: int
    in_features: int
    out_features: int
    dtype: torch.dtype
    training: bool  # forward + both backward GEMMs (training form) or the forward alone (inference form)
    recipe_format: str
    scaled_mm: bool = True  # FP8 tensor-core GEMMs; False: quantize-dequantize around a 16-bit GEMM

    def describe(self) -> str:
        kind = "fwd+bwd" if self.training else "fwd"
        emulated = "" if self.scaled_mm else " (FP8 emulated: dimensions not multiples of 16)"
        return f"{self.tokens}x{self.in_features}->{self.out_features} {kind}{emulated}"


@dataclasses.dataclass(frozen=True)
class Decision:
    shape: GemmShape
    bf16_ms: float
    fp8_ms: float

    @property
    def use_fp8(self) -> bool:
        return self.fp8_ms < self.bf16_ms

    def describe(self) -> str:
        choice = "fp8" if self.use_fp8 else "bf16"
        return (
            f"{self.shape.describe()}: bf16 {self.bf16_ms:.3f} ms, fp8 {self.fp8_ms:.3f} ms "
            f"({self.bf16_ms / self.fp8_ms:.2f}x) -> {choice}"
        )


_decisions: dict[GemmShape, Decision] = {}
_unreported: list[Decision] = []
_lock = threading.Lock()


def _time_pair(x2d: torch.Tensor, weight: torch.Tensor, recipe, shape: GemmShape, out_dtype) -> tuple[float, float]:
    """(bf16 ms, fp8 ms) of the GEMM(s) of ``shape`` on copies of the layer's own operands."""
    x = x2d.detach()
    w = weight.detach()
    grad = torch.randn(shape.tokens, shape.out_features, device=x.device, dtype=out_dtype) if shape.training else None

    def high_precision():
        F.linear(x, w).to(out_dtype)
        if grad is not None:
            grad.to(x.dtype) @ w
            grad.t().to(x.dtype) @ x

    scalers = {role: recipe.make_scaler(role) for role in ("input", "weight", "grad_output")}

    # The inference form quantizes its weight once (then reuses the codes): only x's cast and the GEMM count.
    prepared = (
        None if grad is not None else prepare_inference_weight(w, scalers["weight"], None, out_dtype, shape.scaled_mm)
    )

    def quantized():
        shared_input.entry = None  # each timed call encodes its input itself
        if grad is None:
            with torch.no_grad():
                inference_gemm(x, prepared, scalers["input"], None, out_dtype, shape.scaled_mm)
            return
        with torch.enable_grad():
            xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
            QuantizedLinearFunction.apply(xg, wg, scalers, None, out_dtype, shape.scaled_mm, True).backward(grad)

    with outside_saved_tensor_hooks():
        with torch.no_grad():
            for _ in range(WARMUP_CALLS):
                high_precision()
        for _ in range(WARMUP_CALLS):
            quantized()
        with torch.no_grad():
            bf16_ms = _elapsed_ms(high_precision, TIMED_CALLS)
        return bf16_ms, _elapsed_ms(quantized, TIMED_CALLS)


FP8_FORMATS = ("e4m3", "e5m2", "hybrid")


def measured_here(recipe, x2d: torch.Tensor, on_scaled_mm: bool) -> bool:
    """Whether ``quant.select: measured`` decides this call by timing: FP8 recipes on FP8 tensor cores, and FP8
    recipes emulated on a GPU (a shape whose dimensions torch._scaled_mm does not take), which then compete on
    speed with bf16 too. HiF8 and FP8 emulated on the CPU are about numerics, not speed: always quantized."""
    if recipe.select != "measured" or recipe.format not in FP8_FORMATS:
        return False
    return on_scaled_mm or x2d.is_cuda


@torch.compiler.disable
def fp8_pays_off(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    recipe,
    training: bool,
    out_dtype: torch.dtype,
    group: dist.ProcessGroup | None = None,
    on_scaled_mm: bool = True,
) -> bool:
    """Whether the FP8 GEMM(s) of this shape beat bf16 on this device (measured on the first call, then cached)."""
    shape = GemmShape(x2d.shape[0], x2d.shape[1], weight.shape[0], x2d.dtype, training, recipe.format, on_scaled_mm)
    decision = _decisions.get(shape)
    if decision is None:
        # Under inference mode no backward can be taken, so only the forward is timed.
        measured = shape if not torch.is_inference_mode_enabled() else dataclasses.replace(shape, training=False)
        bf16_ms, fp8_ms = _time_pair(x2d, weight, recipe, measured, out_dtype)
        if group is not None and dist.get_world_size(group) > 1:
            times = torch.tensor([bf16_ms, fp8_ms], dtype=torch.float64, device=x2d.device)
            dist.all_reduce(times, group=group)
            bf16_ms, fp8_ms = (value / dist.get_world_size(group) for value in times.tolist())
        decision = Decision(shape, bf16_ms, fp8_ms)
        with _lock:
            _decisions[shape] = decision
            _unreported.append(decision)
    return decision.use_fp8


def record_decision(shape: GemmShape, bf16_ms: float, fp8_ms: float) -> None:
    """Set the decision for ``shape`` from times measured elsewhere (a table, a benchmark, a test)."""
    with _lock:
        _decisions[shape] = Decision(shape, bf16_ms, fp8_ms)


def decisions() -> list[Decision]:
    """Every decision made in this process, in the order they were made."""
    with _lock:
        return list(_decisions.values())


def new_decisions() -> list[str]:
    """One line per decision made since the last call (for the job's log)."""
    with _lock:
        lines = [decision.describe() for decision in _unreported]
        _unreported.clear()
    return lines


def reset_decisions() -> None:
    """Forget every decision (tests; a new device)."""
    with _lock:
        _decisions.clear()
        _unreported.clear()
