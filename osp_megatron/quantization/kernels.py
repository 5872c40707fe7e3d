"""Fusion of the elementwise quantization arithmetic: torch.compile on CUDA, plain eager elsewhere.

An eager HiF8 quantize-dequantize is ~20 passes over memory; compiled it is a single fused kernel.
"""

import functools
import warnings
from collections.abc import Callable

import torch

_compile_enabled = True


def set_kernel_compilation(enabled: bool) -> None:
    """Turn torch.compile of the quantization kernels on CUDA on (the default) or off."""
    global _compile_enabled
    _compile_enabled = enabled


def fused_on_cuda(function: Callable) -> Callable:
    """``function`` compiled (dynamic shapes) when its first argument is a CUDA tensor.

    The compiled and eager versions give identical results: every step of the kernels is exact
    (powers-of-two scaling, floor, comparisons), so fusion cannot change a rounding.  If
    compilation is unavailable on a machine, the eager version is used from then on.
    """
    compiled = None
    failed = False

    @functools.wraps(function)
    def dispatch(tensor: torch.Tensor, *args, **kwargs):
        nonlocal compiled, failed
        if tensor.is_cuda and _compile_enabled and not failed and not torch.compiler.is_compiling():
            try:
                if compiled is None:
                    compiled = torch.compile(function, dynamic=True)
                return compiled(tensor, *args, **kwargs)
            except Exception as error:  # toolchains (Triton, a C compiler) differ between images
                failed = True
                warnings.warn(f"torch.compile of {function.__name__} failed ({error!r}); running eager")
        return function(tensor, *args, **kwargs)

    return dispatch
