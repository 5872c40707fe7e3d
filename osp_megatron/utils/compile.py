"""torch.compile for accelerator tensors, eager on the CPU: the element-wise kernels of the model and the layouts.

OSP_MEGATRON_COMPILE chooses: "1" (default) compiles for CUDA tensors, "0" never, "force" / "partition" on the CPU too.
"""

import functools
import os

import torch

# "0" disables compilation, "force" compiles on the CPU too (for testing the compiled graphs), "partition" also
# compiles everywhere but only splits each graph into forward and backward as inductor does (same decompositions,
# same min-cut partitioner: the same tensors saved for the backward) and runs the pieces eagerly, without
# generating kernels, for any shape from one trace: what the activation-memory measurement needs, in seconds.
_COMPILE = os.environ.get("OSP_MEGATRON_COMPILE", "1")
_PARTITION_ONLY = _COMPILE == "partition"


def accelerator_compiled(fn):
    """Run `fn` compiled (fullgraph, static shapes) for CUDA tensors and eagerly otherwise."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if _COMPILE != "0" and (args[0].is_cuda or _COMPILE in ("force", "partition")):
            if compiled is None:
                # One graph per distinct shape (full and sparse layouts, resolutions, dtypes): the default
                # limit of 8 would silently fall back to eager after a few resolutions.
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                torch._dynamo.config.accumulated_cache_size_limit = max(
                    torch._dynamo.config.accumulated_cache_size_limit, 512
                )
                compiled = torch.compile(
                    fn,
                    fullgraph=True,
                    dynamic=_PARTITION_ONLY,
                    backend="aot_eager_decomp_partition" if _PARTITION_ONLY else "inductor",
                )
            return compiled(*args)
        return fn(*args)

    return wrapper
