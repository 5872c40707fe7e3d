"""Quantization recipes (delayed scaling, current scaling, HiF8) and per-tensor scale bookkeeping.

A recipe says which format and scaling rule each GEMM operand uses; a TensorScaler keeps the amax
history and scale of one operand role of one linear layer and can be checkpointed.
"""

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from osp_megatron.config.errors import ConfigError
from osp_megatron.quantization.formats import E4M3, E5M2, HIF8, Format, FP8Format
from osp_megatron.quantization.kernels import fused_on_cuda
from osp_megatron.quantization.options import (  # noqa: F401  (re-exported)
    AMAX_COMPUTE_ALGOS,
    BACKENDS,
    SELECTIONS,
    check_recipe_combination,
    require_bool,
    require_choice,
    require_int,
)

ROLES = ("input", "weight", "grad_output")
# Formats per recipe "format": (inputs and weights, output gradients).
FORMAT_PAIRS = {
    "e4m3": (E4M3, E4M3),
    "e5m2": (E5M2, E5M2),
    "hybrid": (E4M3, E5M2),
    "hif8": (HIF8, HIF8),
}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Per-tensor scaling recipe; subclasses choose when the scale is computed.

    format: "hybrid" (E4M3 inputs/weights, E5M2 gradients), "e4m3", "e5m2" or "hif8".
    margin: the scale is divided by 2^margin (headroom against amax growth).
    forward_target / backward_target: value the amax of x and W / of the output gradient is
    scaled to; None means the format's default (FP8: its maximum; HiF8: 15 and 224).
    stochastic_grad_rounding: hybrid stochastic rounding of output gradients (HiF8 only).
    backend: "auto", "emulate", "scaled_mm" or "transformer_engine" (see docs/quantization.md).
    select: "measured" (real FP8 GEMMs only for the shapes a timing on the device found faster than bf16) or
        "all" (every selected layer); FP8 emulated on a GPU is measured too; HiF8 and the CPU always quantize.
    """

    format: str = "hybrid"
    margin: int = 0
    forward_target: float | None = None
    backward_target: float | None = None
    stochastic_grad_rounding: bool = False
    backend: str = "auto"
    select: str = "measured"

    delayed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate(type(self).__name__)

    @property
    def history_len(self) -> int:
        return 1

    @property
    def compute_algo(self) -> str:
        return "most_recent"

    def validate(self, prefix: str) -> None:
        """Check every field; errors name ``prefix.field`` and the allowed values."""
        require_choice(self.format, FORMAT_PAIRS, f"{prefix}.format")
        require_int(self.margin, 0, f"{prefix}.margin")
        for name in ("forward_target", "backward_target"):
            target = getattr(self, name)
            if target is not None and not (isinstance(target, (int, float)) and target > 0):
                raise ConfigError(f"{prefix}.{name}: got {target!r}; allowed: a positive number or null")
        require_bool(self.stochastic_grad_rounding, f"{prefix}.stochastic_grad_rounding")
        require_choice(self.backend, BACKENDS, f"{prefix}.backend")
        require_choice(self.select, SELECTIONS, f"{prefix}.select")
        check_recipe_combination(self.format, self.stochastic_grad_rounding, self.backend, prefix)

    def format_for(self, role: str) -> Format:
        forward, backward = FORMAT_PAIRS[self.format]
        return backward if role == "grad_output" else forward

    def target_for(self, role: str) -> float:
        fmt = self.format_for(role)
        if role == "grad_output":
            return self.backward_target if self.backward_target is not None else fmt.backward_target
        return self.forward_target if self.forward_target is not None else fmt.forward_target

    def make_scaler(self, role: str) -> "TensorScaler":
        """A fresh scale bookkeeper for ``role`` ("input", "weight" or "grad_output")."""
        require_choice(role, ROLES, "role")
        return TensorScaler(
            fmt=self.format_for(role),
            target=self.target_for(role),
            margin=self.margin,
            history_len=self.history_len,
            compute_algo=self.compute_algo,
            delayed=self.delayed,
            stochastic=self.stochastic_grad_rounding and role == "grad_output",
        )


@dataclass(frozen=True, kw_only=True)
class CurrentScaling(Recipe):
    """Scale from the amax of the tensor being quantized (just in time, like Float8CurrentScaling)."""


@dataclass(frozen=True, kw_only=True)
class DelayedScaling(Recipe):
    """Scale from the amax history of earlier calls (like Transformer Engine's DelayedScaling).

    amax_history_len: how many past amaxes are kept; amax_compute_algo: "max" over the history or
    "most_recent".  The very first call, with an empty history, scales from its own amax.
    """

    amax_history_len: int = 1024
    amax_compute_algo: str = "max"

    delayed: ClassVar[bool] = True

    @property
    def history_len(self) -> int:
        return self.amax_history_len

    @property
    def compute_algo(self) -> str:
        return self.amax_compute_algo

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_int(self.amax_history_len, 1, f"{prefix}.amax_history_len")
        require_choice(self.amax_compute_algo, AMAX_COMPUTE_ALGOS, f"{prefix}.amax_compute_algo")


@dataclass(frozen=True, kw_only=True)
class HiF8Recipe(CurrentScaling):
    """OSP-Next HiF8 training: current per-tensor scaling to 15 (x, W) and 224 (gradients)."""

    format: str = "hif8"


class TensorScaler:
    """Amax history and scale of one quantized operand role (input, weight or grad_output).

    The amax is all-reduced (MAX) over ``group`` so that ranks holding pieces of one logical
    tensor agree on its scale.  Non-finite amaxes are recorded as 0 ("no information"), so an
    overflow step leaves the scale unchanged instead of poisoning the history.
    """

    def __init__(
        self,
        fmt: Format,
        target: float,
        margin: int = 0,
        history_len: int = 1,
        compute_algo: str = "most_recent",
        delayed: bool = False,
        stochastic: bool = False,
    ):
        self.format = fmt
        self.target = float(target)
        self.margin = margin
        self.compute_algo = compute_algo
        self.delayed = delayed
        self.stochastic = stochastic
        self.amax_history = torch.zeros(history_len, dtype=torch.float32)
        self.scale = torch.ones((), dtype=torch.float32)
        self.num_updates = 0

    def _to_device(self, device: torch.device) -> None:
        if self.scale.device != device:
            self.amax_history = self.amax_history.to(device)
            self.scale = self.scale.to(device)

    def _scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        scale = self.target / (amax * 2.0**self.margin)
        usable = (amax > 0) & torch.isfinite(amax)
        return torch.where(usable, scale, self.scale)

    def compute_scale(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Scale to quantize ``tensor`` with now; records its amax and updates the next scale."""
        self._to_device(tensor.device)
        if tensor.numel() == 0:
            amax = torch.zeros((), dtype=torch.float32, device=tensor.device)
        else:
            # One pass over memory, without materialising |tensor|.
            amax = torch.linalg.vector_norm(tensor.detach(), ord=math.inf).to(torch.float32)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        if self.delayed and self.num_updates > 0:
            scale = self.scale
        else:
            scale = self._scale_from_amax(amax)
        self._record(amax)
        return scale

    def _record(self, amax: torch.Tensor) -> None:
        history = torch.roll(self.amax_history, 1)
        history[0] = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
        self.amax_history = history
        reduced = history.max() if self.compute_algo == "max" else history[0]
        self.scale = self._scale_from_amax(reduced)
        self.num_updates += 1

    def quantize_dequantize(
        self,
        tensor: torch.Tensor,
        group: dist.ProcessGroup | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``qdq(tensor * scale) / scale`` in ``tensor``'s dtype, with the scale from ``compute_scale``."""
        scale = self.compute_scale(tensor, group)
        return self.format.scaled_qdq(tensor, scale, stochastic=self.stochastic, generator=generator)

    def encode(
        self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None, row_multiple: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes of ``tensor`` in the format, 1 / scale) with the scale from ``compute_scale``.

        row_multiple: the codes get zero rows appended up to a multiple of it (torch._scaled_mm takes only
        multiples of 16); zeros change no amax, and on CUDA the padding is part of the fused cast.
        """
        if self._fusable(tensor, group):
            codes, _, inverse = self._fused_encode(tensor, transposed=False, row_multiple=row_multiple)
            return codes, inverse
        tensor = _pad_rows(tensor, row_multiple)
        scale = self.compute_scale(tensor, group)
        return self.format.encode(tensor, scale), scale.reciprocal()

    def encode_transposed(
        self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None, row_multiple: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes of the 2-D ``tensor``, the same codes transposed and contiguous, 1 / scale), as ``encode``.

        The FP8 GEMMs of the backward need codes in the other layout (the weight-gradient GEMM the output
        gradient's and the input's, the input-gradient GEMM the weight's); on CUDA with current scaling both
        layouts come from one compiled pass over the tensor.
        """
        if self._fusable(tensor, group):
            return self._fused_encode(tensor, transposed=True, row_multiple=row_multiple)
        codes, inverse = self.encode(tensor, group, row_multiple)
        return codes, codes.t().contiguous(), inverse

    def _fusable(self, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
        """Whether amax, scale, history and cast can run as one compiled computation: FP8 current scaling on CUDA
        without an amax reduction across ranks."""
        return tensor.is_cuda and isinstance(self.format, FP8Format) and self.shares_encodes(tensor, group)

    def _fused_encode(
        self, tensor: torch.Tensor, transposed: bool, row_multiple: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._to_device(tensor.device)
        fmt = self.format
        missing_rows = -tensor.shape[0] % row_multiple
        codes, codes_t, scale, recorded = _fp8_current_scaling_encode(
            tensor, self.scale, self.target, 2.0**self.margin, fmt.max_value, fmt.torch_dtype, transposed, missing_rows
        )
        # The same bookkeeping as compute_scale + _record for a one-entry history of a current-scaling recipe.
        self.amax_history = recorded.reshape(1)
        self.scale = scale
        self.num_updates += 1
        return codes, codes_t, scale.reciprocal()

    def shares_encodes(self, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
        """Whether the codes ``encode`` gives for ``tensor`` depend on nothing but the tensor and ``settings`` (current
        scaling, deterministic rounding, no amax reduction across ranks), so that another scaler with the same
        settings may take them over (``adopt``)."""
        return (
            not self.delayed
            and not self.stochastic
            and len(self.amax_history) == 1
            and tensor.numel() > 0
            and (group is None or dist.get_world_size(group) == 1)
        )

    def settings(self) -> tuple:
        """What, besides the tensor, the codes of a current-scaling encode depend on."""
        return (self.format.name, self.target, self.margin)

    def adopt(self, scale: torch.Tensor, recorded_amax: torch.Tensor) -> None:
        """Take over the outcome of another scaler's encode of the same tensor with the same ``settings``: the
        bookkeeping of ``encode`` without the pass over the tensor. (Where that tensor's amax was 0 or not finite the
        other scaler's previous scale comes with it.)"""
        self._to_device(scale.device)
        self.amax_history = recorded_amax.reshape(1)
        self.scale = scale
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "amax_history": self.amax_history.detach().cpu().clone(),
            "scale": self.scale.detach().cpu().clone(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; a different history length keeps the most recent entries."""
        device = self.scale.device
        saved = state["amax_history"].to(device=device, dtype=torch.float32)
        history = torch.zeros_like(self.amax_history, device=device)
        keep = min(len(history), len(saved))
        history[:keep] = saved[:keep]
        self.amax_history = history
        self.scale = state["scale"].to(device=device, dtype=torch.float32).reshape(())
        self.num_updates = int(state["num_updates"])


def _pad_rows(tensor: torch.Tensor, row_multiple: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to a multiple of ``row_multiple`` (itself if there already)."""
    missing = -tensor.shape[0] % row_multiple
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, missing))


@fused_on_cuda
def _fp8_current_scaling_encode(
    tensor,
    previous_scale,
    target: float,
    margin_factor: float,
    max_value: float,
    fp8_dtype,
    transposed: bool,
    missing_rows: int = 0,
):
    """Current scaling of ``tensor`` into FP8 in one compiled computation: amax, scale (the previous one where the
    amax is 0 or not finite), the codes (saturating, with ``missing_rows`` zero rows appended), optionally their
    transpose, and the amax to record."""
    work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    amax = work.abs().amax()
    usable = (amax > 0) & torch.isfinite(amax)
    scale = torch.where(usable, target / (amax * margin_factor), previous_scale)
    if missing_rows:
        work = torch.nn.functional.pad(work, (0, 0, 0, missing_rows))
    codes = (work * scale).clamp(-max_value, max_value).to(fp8_dtype)
    codes_t = codes.t().contiguous() if transposed else None
    recorded = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
    return codes, codes_t, scale, recorded
