"""Kernel choices made by measurement on the device, gathered for the jobs to report once each."""

from osp_megatron.attention import kernel_choice
from osp_megatron.quantization import selection


def kernel_choice_lines() -> list[str]:
    """One line per choice made since the last call: FP8 or bf16 per quantized GEMM shape (quant.select), the
    attention kernel per shape (model.attention_backend auto on Hopper with flash-attn-4 installed)."""
    lines = [f"GEMM {line}" for line in selection.new_decisions()]
    return lines + [f"attention {line}" for line in kernel_choice.new_decision_lines()]
