"""Communication settings that matter at scale (NCCL, timeouts, PyTorch's flight recorder) and the report a rank
writes when a collective fails, naming the rank and the collective it was waiting in.
"""

import os
import pickle
import socket
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# torch 2.7 renamed the flight recorder's variables; older versions read only the TORCH_NCCL_ names.
_NEW_FLIGHT_RECORDER_NAMES = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 7)
FLIGHT_RECORDER_BUFFER = "TORCH_FR_BUFFER_SIZE" if _NEW_FLIGHT_RECORDER_NAMES else "TORCH_NCCL_TRACE_BUFFER_SIZE"
FLIGHT_RECORDER_FILE = "TORCH_FR_DUMP_TEMP_FILE" if _NEW_FLIGHT_RECORDER_NAMES else "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"
DEFAULT_FLIGHT_RECORDER_PREFIX = "/tmp/nccl_trace_rank_"  # PyTorch's own default dump location

# Defaults for every job; a value already in the environment always wins (docs/cluster.md explains each).
COMMUNICATION_DEFAULTS = {
    # NVLink SHARP (multicast) allocates extra memory per communicator and fails on fabrics that do not allow it.
    "NCCL_NVLS_ENABLE": "0",
    # NCCL explains the failure in the log (which peer, which transport) instead of failing silently.
    "NCCL_DEBUG": "WARN",
    # A failed or timed-out collective aborts the communicator and ends the process instead of hanging it.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    # The flight recorder keeps the last N collectives of every process group (op, sizes, sequence number, state)
    # and every rank dumps it when one times out: the dumps show which rank waited on which collective.
    FLIGHT_RECORDER_BUFFER: "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}


def apply_communication_defaults(environ=os.environ) -> dict:
    """Set each default that the environment does not set; returns the ones that were set here."""
    applied = {name: value for name, value in COMMUNICATION_DEFAULTS.items() if name not in environ}
    environ.update(applied)
    return applied


def flight_recorder_prefix() -> str:
    """Where this job's flight-recorder dumps go: one file per rank, `<prefix><rank>`."""
    return os.environ.get(FLIGHT_RECORDER_FILE) or os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE") \
        or DEFAULT_FLIGHT_RECORDER_PREFIX


def _last_collectives(trace: dict, count: int = 3) -> list[dict]:
    return sorted(trace.get("entries", []), key=lambda e: e.get("record_id", 0))[-count:]


def _describe(entry: dict) -> str:
    group = entry.get("process_group", ("?", "?"))
    sizes = entry.get("input_sizes")
    return (f"#{entry.get('collective_seq_id')} {entry.get('profiling_name')} on group {group[1]} (id {group[0]}), "
            f"input sizes {sizes}, state {entry.get('state')}")


def dump_flight_recorder() -> Optional[Path]:
    """Write this rank's flight-recorder buffer where NCCL's own timeout dump would go (kept if already there)."""
    dump = getattr(torch._C._distributed_c10d, "_dump_fr_trace", None)
    if dump is None or not dist.is_initialized():
        return None
    path = Path(f"{flight_recorder_prefix()}{dist.get_rank()}")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dump())
    return path


def collective_failure_report(error: BaseException) -> Optional[str]:
    """The lines a rank prints when `error` came out of a collective (a timeout or a lost peer); None otherwise.

    They name the rank, its host and the last collectives it entered (the one it waited in is the newest), and
    where the flight-recorder dump went; `torchfrtrace <folder>` over all ranks' dumps names the missing ranks.
    """
    distributed_error = isinstance(error, getattr(dist, "DistError", ())) or "timed out" in str(error).lower() \
        or any(phrase in str(error).lower() for phrase in ("monitoredbarrier", "closed by peer"))
    if not distributed_error or not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = [f"[rank {rank}/{world} on {socket.gethostname()}] collective failed: {str(error).strip()}"]
    path = dump_flight_recorder()
    if path is not None:
        entries = _last_collectives(pickle.loads(path.read_bytes()))
        if entries:
            lines.append(f"[rank {rank}] waiting in collective " + _describe(entries[-1]))
            lines += [f"[rank {rank}]   before it: " + _describe(entry) for entry in reversed(entries[:-1])]
        lines.append(f"[rank {rank}] flight recorder dump: {path} (compare all ranks: torchfrtrace "
                     f"{path.parent} --prefix {path.name[:-len(str(rank))]})")
    return "\n".join(lines)


def install_collective_failure_report() -> None:
    """Print `collective_failure_report` for an uncaught distributed error before Python's own traceback."""
    if getattr(sys.excepthook, "_osp_collective_report", False):
        return
    previous = sys.excepthook

    def report_then_raise(kind, error, traceback):
        try:
            report = collective_failure_report(error)
        except Exception as reporting_error:  # the original error matters more than the report
            report = f"(no collective report: {reporting_error})"
        if report:
            sys.stderr.write(report + "\n")
            sys.stderr.flush()
        previous(kind, error, traceback)

    report_then_raise._osp_collective_report = True
    sys.excepthook = report_then_raise
