"""Where a GPU sits idle inside a profiled step: gaps between kernels and what the host did meanwhile.

Reads a Chrome trace written by torch.profiler (CPU + CUDA activities) and prints the busy time, the idle
time, the largest gaps with the kernels around them and the CPU operators open while the GPU waited, and
the CUDA runtime calls that block the host (synchronisations, allocations, copies).
Example: python benchmarks/trace_gaps.py trace.json
"""

import argparse
import bisect
import collections
import json

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
BLOCKING_CALLS = ("Synchronize", "Malloc", "Free", "Memcpy", "cudaStreamWaitEvent", "HostAlloc")


def _load(path):
    with open(path) as handle:
        events = json.load(handle)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _merge(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def analyse(path: str, top: int = 12, min_gap_us: float = 200.0) -> str:
    """Text report of GPU idle time in the trace at `path`."""
    events = _load(path)
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return f"{path}: no GPU activity in the trace"
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver"]
    launches = {e["args"].get("correlation"): e for e in runtime if "correlation" in e.get("args", {})}

    busy = _merge([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(end - start for start, end in busy)
    kernel_sum = sum(e["dur"] for e in gpu)
    lines = [
        f"trace {path}",
        f"GPU span {span / 1e3:9.1f} ms | busy {busy_us / 1e3:9.1f} ms | idle {(span - busy_us) / 1e3:8.1f} ms"
        f" | kernel+copy sum {kernel_sum / 1e3:9.1f} ms ({len(gpu)} GPU events)",
    ]

    starts = [e["ts"] for e in gpu]
    gaps = []
    for (_, end), (start, _) in zip(busy, busy[1:]):
        if start - end >= min_gap_us:
            gaps.append((start - end, end, start))
    gaps.sort(reverse=True)
    lines.append(f"gaps >= {min_gap_us / 1e3:.1f} ms: {len(gaps)}, together {sum(g[0] for g in gaps) / 1e3:.1f} ms")
    cpu_ops.sort(key=lambda e: e["ts"])
    op_starts = [e["ts"] for e in cpu_ops]
    for gap, end, start in gaps[:top]:
        before = gpu[bisect.bisect_right(starts, end) - 1]
        after = gpu[bisect.bisect_left(starts, start)]
        launch = launches.get(after.get("args", {}).get("correlation"))
        launch_note = ""
        if launch is not None:
            launch_note = f" launched by {launch['name']} at {(launch['ts'] - end) / 1e3:+.2f} ms into the gap"
        # CPU operators that overlap the gap (outermost first), which is what the host was busy with.
        lo = bisect.bisect_left(op_starts, end - 5e6)
        open_ops = [
            e
            for e in cpu_ops[lo : bisect.bisect_right(op_starts, start)]
            if e["ts"] < start and e["ts"] + e["dur"] > end
        ]
        names = collections.OrderedDict()
        for e in sorted(open_ops, key=lambda e: -e["dur"])[:6]:
            names[e["name"][:60]] = None
        lines.append(f"  {gap / 1e3:8.2f} ms after {before['name'][:50]!r} before {after['name'][:50]!r}{launch_note}")
        if names:
            lines.append(f"           host inside: {' > '.join(names)}")

    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if any(word in e["name"] for word in BLOCKING_CALLS):
            totals[e["name"]][0] += 1
            totals[e["name"]][1] += e["dur"]
    if totals:
        lines.append("host-blocking CUDA runtime calls:")
        for name, (count, dur) in sorted(totals.items(), key=lambda item: -item[1][1]):
            lines.append(f"  {name:40s} x{count:5d} {dur / 1e3:9.2f} ms")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", help="Chrome trace JSON files from torch.profiler")
    parser.add_argument("--top", type=int, default=12, help="largest gaps to list")
    parser.add_argument("--min-gap-ms", type=float, default=0.2, help="smallest gap counted")
    args = parser.parse_args()
    for path in args.traces:
        print(analyse(path, args.top, args.min_gap_ms * 1e3))


if __name__ == "__main__":
    main()
