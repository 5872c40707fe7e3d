"""FP8 self-attention under the quantization recipes (``quant.attention: true``).

``apply_quantization`` gives every selected self-attention core (modules named ``*self_attention.core_attention``)
an AttentionQuantizationState; the core asks ``attention_kernel(self)`` for the kernel to run. Inside a
``quantized_autocast(enabled=False)`` block, or with a HiF8 recipe in effect, the 16-bit kernel runs.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch

from osp_megatron.quantization.autocast import autocast_frames
from osp_megatron.quantization.fp8_attention import FP8AttentionState, fp8_dot_product_attention
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
    return functools.partial(fp8_dot_product_attention, state=state.fp8)


def quantized_attention_modules(model: torch.nn.Module) -> dict[str, AttentionQuantizationState]:
    """Qualified name -> FP8 attention state of every self-attention core running FP8 attention."""
    return {
        name: module.__dict__[ATTENTION_STATE_ATTRIBUTE]
        for name, module in model.named_modules()
        if ATTENTION_STATE_ATTRIBUTE in module.__dict__
    }


def is_self_attention_core(name: str) -> bool:
    return name.endswith(SELF_ATTENTION_CORE_SUFFIX)
