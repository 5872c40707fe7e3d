"""FP8 self-attention under the quantization recipes (``quant.attention: true``).

``apply_quantization`` gives every selected self-attention core (modules named ``*self_attention.core_attention``)
an AttentionQuantizationState; the core asks ``attention_kernel(self)`` for the kernel to run. Inside a
``quantized_autocast(enabled=False)`` block, or with a HiF8 recipe in effect, the 16-bit kernel runs.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch

from osp_megatron.attention.dispatch import dot_product_attention
from osp_megatron.attention.kernel_choice import KernelKey, attention_direction, choose_kernel, worth_probing
from osp_megatron.quantization.autocast import autocast_frames
from osp_megatron.quantization.fp8_attention import (
    FP8AttentionState,
    fp8_attention_supported,
    fp8_dot_product_attention,
)
from osp_megatron.quantization.options import FP8_ATTENTION_FORMATS
from osp_megatron.quantization.recipes import Recipe

ATTENTION_STATE_ATTRIBUTE = "_attention_quantization"
SELF_ATTENTION_CORE_SUFFIX = "self_attention.core_attention"


class AttentionQuantizationState:
    """Recipe and FP8 gradient-scale history of one self-attention core."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.fp8 = FP8AttentionState()

    def active(self) -> bool:
        """Whether this call runs in FP8: the innermost autocast block (if any) enables an FP8 recipe."""
        frames = autocast_frames()
        recipe = self.recipe
        if frames:
            if not frames[-1].enabled:
                return False
            recipe = frames[-1].recipe or recipe
        return recipe.format in FP8_ATTENTION_FORMATS

    def state_dict(self) -> dict[str, Any]:
        return {"fp8_attention": self.fp8.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fp8.load_state_dict(state["fp8_attention"])


def attention_kernel(module: torch.nn.Module) -> Callable | None:
    """The attention function ``(q, k, v) -> out`` a core should run now, or None for its 16-bit default."""
    state = module.__dict__.get(ATTENTION_STATE_ATTRIBUTE)
    if state is None or not state.active():
        return None
    if state.recipe.select == "measured":
        return functools.partial(measured_fp8_attention, state=state.fp8)
    return functools.partial(fp8_dot_product_attention, state=state.fp8)


def measured_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: FP8AttentionState):
    """FP8 attention where it is faster for this shape and direction, else the 16-bit kernel (quant.select measured).

    The first call of a shape times both on tensors of that shape (kernel_choice's probe; the FP8 side with a
    throwaway gradient-scale state, so the layer's own history is untouched) and prints the choice like the other
    kernel choices; FP8 wins ties. Where FP8 attention cannot run, or the shape is below the probe's size
    threshold, this is fp8_dot_product_attention.
    """
    if not (fp8_attention_supported(q) and q.shape == k.shape == v.shape):
        return fp8_dot_product_attention(q, k, v, state=state)
    key = KernelKey(*q.shape[:2], k.shape[1], *q.shape[2:], q.dtype, attention_direction(q, k, v), "FP8 or 16-bit")
    if not worth_probing(key):
        return fp8_dot_product_attention(q, k, v, state=state)
    probe_state = FP8AttentionState()
    candidates = {
        "fp8": lambda q, k, v: fp8_dot_product_attention(q, k, v, state=probe_state),
        "16-bit": dot_product_attention,
    }
    if choose_kernel(key, q.device, candidates) == "fp8":
        return fp8_dot_product_attention(q, k, v, state=state)
    return dot_product_attention(q, k, v)


def quantized_attention_modules(model: torch.nn.Module) -> dict[str, AttentionQuantizationState]:
    """Qualified name -> FP8 attention state of every self-attention core running FP8 attention."""
    return {
        name: module.__dict__[ATTENTION_STATE_ATTRIBUTE]
        for name, module in model.named_modules()
        if ATTENTION_STATE_ATTRIBUTE in module.__dict__
    }


def is_self_attention_core(name: str) -> bool:
    return name.endswith(SELF_ATTENTION_CORE_SUFFIX)
