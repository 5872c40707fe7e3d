"""Fusion of the elementwise quantization arithmetic: torch.compile on CUDA, plain eager elsewhere.

An eager HiF8 quantize-dequantize is ~20 passes over memory; compiled it is a single fused kernel.
"""

import functools
import types
import warnings
from collections.abc import Callable

import torch

_compile_enabled = True
COMPILE_DEVICES = ("cuda",)  # device types whose tensors take the compiled kernels


def set_kernel_compilation(enabled: bool) -> None:
    """Turn torch.compile of the quantization kernels on CUDA on (the default) or off."""
    global _compile_enabled
    _compile_enabled = enabled


def _specialization_key(values) -> tuple:
    """What a compiled graph is specialised on anyway: the dtypes of the tensors, the flags (bools, dtypes,
    strings, None) and the float constants (torch.compile bakes them in). Sizes stay dynamic within one graph."""
    key = []
    for value in values:
        if isinstance(value, torch.Tensor):
            key.append(value.dtype)
        elif value is None or isinstance(value, (bool, float, str, torch.dtype)):
            key.append(value)
    return tuple(key)


def _own_code_copy(function: Callable, index: int) -> Callable:
    """``function`` with a code object of its own: torch._dynamo keeps its graphs, and counts them against its
    recompilation limit (8), per code object, so each specialisation gets its own budget."""
    code = function.__code__.replace(co_name=f"{function.__code__.co_name}_{index}")
    copy = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def _plain(value):
    """A tensor as a plain one, neither a parameter (torch.compile makes a parameter's shape static: one graph per
    weight shape) nor a view (a compiled graph guards on a view's base too); only called where no gradient is being
    recorded."""
    return value.detach() if isinstance(value, torch.Tensor) else value


def fused_on_cuda(function: Callable) -> Callable:
    """``function`` compiled (dynamic shapes) when its first argument is a CUDA tensor.

    The compiled and eager versions give identical results: every step of the kernels is exact
    (powers-of-two scaling, floor, comparisons), so fusion cannot change a rounding.  If
    compilation is unavailable on a machine, the eager version is used from then on. One compiled version per
    specialisation key (tensor dtypes and flag arguments), each with its own recompilation budget; the functions
    are elementwise and dtype-explicit, so they run with autocast off (one graph whether or not the caller is
    under autocast) and take parameters and views as plain tensors where no gradient is recorded.
    """
    compiled: dict[tuple, Callable] = {}
    failed = False

    @functools.wraps(function)
    def dispatch(tensor: torch.Tensor, *args, **kwargs):
        nonlocal failed
        if (
            tensor.device.type in COMPILE_DEVICES
            and _compile_enabled
            and not failed
            and not torch.compiler.is_compiling()
        ):
            try:
                key = _specialization_key((tensor, *args, *kwargs.values()))
                if key not in compiled:
                    compiled[key] = torch.compile(_own_code_copy(function, len(compiled)), dynamic=True)
                if not torch.is_grad_enabled():
                    tensor, args = _plain(tensor), tuple(_plain(arg) for arg in args)
                with torch.autocast(tensor.device.type, enabled=False):
                    return compiled[key](tensor, *args, **kwargs)
            except Exception as error:  # toolchains (Triton, a C compiler) differ between images
                failed = True
                warnings.warn(f"torch.compile of {function.__name__} failed ({error!r}); running eager")
        return function(tensor, *args, **kwargs)

    return dispatch
