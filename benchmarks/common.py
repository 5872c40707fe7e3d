"""Shared benchmark helpers: event-timed medians (slowest rank wins), random-weight DiTs made on the device.

Every benchmark script in this folder times and builds models through these, so their numbers compare.
"""

import json
import statistics
import sys
import time
from datetime import date

import torch
import torch.distributed as dist

from osp_megatron.engine.model import materialize
from osp_megatron.engine.parallelize import parallelize_dit
from osp_megatron.models.builder import build_model


def timed(fn, warmup: int, repeat: int, device, before=None) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, wall clock on CPU); with several ranks, the slowest.

    before: run (untimed) right before every timed call, e.g. to put the GPU in a given state first.
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if distributed:
            dist.barrier()
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tick) * 1e3)
    median = statistics.median(times)
    if distributed:  # a step is only as fast as its last rank
        value = torch.tensor([median], dtype=torch.float64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        median = float(value)
    return median


def hybrid_layout(blocks: int) -> list:
    """Per-block kinds with OSP-Next's 1:4 full:sparse ratio (8 full of 40) for a shortened model.

    Multiples of 10 keep the "dual end" shape (blocks/10 full at each end); other multiples of 5 put their
    blocks/5 full blocks first. Sparse blocks alternate the token and group patterns.
    """
    if blocks < 5 or blocks % 5:
        raise SystemExit(f"--blocks {blocks}: use a multiple of 5 so that a fifth of the blocks are full attention")
    ends = (blocks // 10, blocks // 10) if blocks % 10 == 0 else (blocks // 5, 0)
    kinds = []
    for index in range(blocks):
        if index < ends[0] or index >= blocks - ends[1]:
            kinds.append("full")
        else:
            kinds.append("token" if (index - ends[0]) % 2 == 0 else "group")
    return kinds


def random_model(config, device, dtype, layer_spec=None, role="train", quant=None):
    """The DiT with random weights made on the device (shapes on meta first: no CPU initialisation of 14B), made
    into the model a job runs by the engine's parallelize_dit (the current layout's token layout, `quant`)."""
    model = build_model(config, meta=True, layer_spec=layer_spec)
    parallelize_dit(model, role, quant=quant, device=device)
    materialize(model, device)
    generator = torch.Generator(device=device).manual_seed(0)  # same weights on every rank
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.to(dtype)


def write_report(path: str, rows, device, **extra) -> dict:
    """JSON with date, device, torch version, the command line and the rows; returns it."""
    info = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        **extra,
        "rows": rows,
    }
    with open(path, "w") as handle:
        json.dump(info, handle, indent=2, default=str)
    return info
