"""The quantized autocast context: which recipe (or none) quantized linears and attention cores use inside a block.

A thread-local stack of frames; the innermost frame decides, as with torch.autocast (docs/quantization.md).
"""

import contextlib
import threading
from dataclasses import dataclass

import torch.distributed as dist

from osp_megatron.quantization.recipes import Recipe


@dataclass
class _AutocastFrame:
    enabled: bool
    recipe: Recipe | None
    group: dist.ProcessGroup | None


_autocast_frames = threading.local()


def autocast_frames() -> list[_AutocastFrame]:
    if not hasattr(_autocast_frames, "stack"):
        _autocast_frames.stack = []
    return _autocast_frames.stack


@contextlib.contextmanager
def quantized_autocast(
    enabled: bool = True,
    recipe: Recipe | None = None,
    amax_reduction_group: dist.ProcessGroup | None = None,
):
    """Choose how layers prepared by ``apply_quantization`` run their GEMMs inside the block.

    enabled=False runs them in high precision.  A ``recipe`` given here becomes each layer's recipe
    from its next call on (scale histories restart, as they belong to the old format); an
    ``amax_reduction_group`` given here is used inside the block only.  Outside any block layers
    quantize with their current recipe.  The choice is captured in the forward pass, so backward
    may run outside the block.
    """
    autocast_frames().append(_AutocastFrame(enabled, recipe, amax_reduction_group))
    try:
        yield
    finally:
        autocast_frames().pop()
