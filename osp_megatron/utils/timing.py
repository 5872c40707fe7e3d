"""Timing a kernel on the device inside a running job, for the choices made by measurement (attention kernels,
FP8 or bf16 GEMMs): CUDA-event medians, and a shield that keeps the timing's own autograd graphs away from the
caller's saved-tensor hooks."""

import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch


def median_cuda_ms(run: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of run() over `repeats` calls, each timed with CUDA events on the current stream."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def outside_saved_tensor_hooks() -> Iterator[None]:
    """Autograd graphs built inside keep their saved tensors as they are: the caller's hooks (activation
    checkpointing, offloading) must not count a probe's graphs as the block's own, or a checkpointed block's
    recomputation no longer matches its forward."""
    with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
        yield
