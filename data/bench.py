"""`osp-data bench`: how fast the training loader reads a shard folder (samples/s, MB/s, per-batch latency).

Runs the same WebDatasetLoader `osp-train` uses, with its workers and batch settings, on one rank.
"""

import statistics
import time

from osp_megatron.data.config import DataConfig
from osp_megatron.data.loader import WebDatasetLoader


def bench_loader(
    config: DataConfig,
    micro_batch_size: int = 1,
    global_batch_size: int | None = None,
    batches: int = 50,
    warmup: int = 3,
    seed: int = 0,
) -> dict:
    """Read warmup + batches micro-batches; returns samples/s, MB/s, batch latency percentiles (ms) and this
    process's CPU time per sample."""
    loader = WebDatasetLoader(config, micro_batch_size, seed=seed, global_batch_size=global_batch_size)
    try:
        for _ in range(warmup):
            next(loader)
        samples = read = bad = 0
        latencies = []
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(batches):
            tick = time.perf_counter()
            batch = next(loader)
            latencies.append((time.perf_counter() - tick) * 1e3)
            samples += len(batch["keys"])
            read += batch["bytes_read"]
            bad += batch["bad_samples"]
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        loader.close()
    latencies.sort()
    return {
        "batches": batches,
        "samples": samples,
        "seconds": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 2),
        "mb_per_s": round(read / 2**20 / elapsed, 2),
        "batch_ms_p50": round(statistics.median(latencies), 2),
        "batch_ms_p95": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        # CPU time of this process per sample: the whole reading cost with 0 workers, whatever the load.
        "cpu_ms_per_sample": round(cpu / samples * 1e3, 2),
        "bad_samples": bad,
        "num_workers": config.num_workers,
        "micro_batch_size": micro_batch_size,
        "buckets": [b.name for b in loader.buckets.values()],
    }
