"""Kernel choices made by measurement on the device, gathered for the jobs to report once each."""

from osp_megatron.quantization import selection


def kernel_choice_lines() -> list[str]:
    """One line per choice made since the last call: FP8 or bf16 per quantized GEMM shape."""
    return [f"GEMM {line}" for line in selection.new_decisions()]
