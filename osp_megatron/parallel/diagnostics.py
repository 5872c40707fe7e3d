"""Communication settings that matter at scale (NCCL, timeouts, PyTorch's flight recorder) and the report a rank
writes when a collective fails, naming the rank and the collective it was waiting in (docs/cluster.md).
"""

import json
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

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
    return (
        os.environ.get(FLIGHT_RECORDER_FILE)
        or os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
        or DEFAULT_FLIGHT_RECORDER_PREFIX
    )


def _last_collectives(trace: dict, count: int = 3) -> list[dict]:
    return sorted(trace.get("entries", []), key=lambda e: e.get("record_id", 0))[-count:]


def _describe(entry: dict) -> str:
    group = entry.get("process_group", ("?", "?"))
    sizes = entry.get("input_sizes")
    return (
        f"#{entry.get('collective_seq_id')} {entry.get('profiling_name')} on group {group[1]} (id {group[0]}), "
        f"input sizes {sizes}, state {entry.get('state')}"
    )


def world_rank() -> tuple[int, int]:
    """(rank, world size) of this process in the whole job: the launcher's, which also holds once the process group
    is gone, and which a split world (reward ranks: a default group per part) numbers uniquely."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _flight_recorder_trace() -> bytes | None:
    dump = getattr(torch._C._distributed_c10d, "_dump_fr_trace", None)
    return dump() if dump is not None else None


def stack_file(path: Path) -> Path:
    """The JSON beside flight-recorder dump `path` (<folder>/rank_3 -> <folder>/stack_rank_3.json): host, error,
    traceback and every thread's stack. Named apart from the dumps so that torchfrtrace reads only those."""
    return path.with_name(f"stack_{path.name}.json")


def dump_flight_recorder(error: BaseException | None = None) -> Path | None:
    """Write this rank's flight-recorder buffer where NCCL's own timeout dump would go (kept if already there),
    and beside it where this process stood: host, the error and its traceback, the stack of every thread.

    Also after the process group is destroyed: the buffer belongs to the process. On gloo the buffer is the
    only record of the collectives; the newest entry is the one the rank waited in.
    """
    trace = _flight_recorder_trace()
    if trace is None:
        return None
    rank, world = world_rank()
    path = Path(f"{flight_recorder_prefix()}{rank}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(trace)
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    where = {
        "rank": rank,
        "world_size": world,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "error": None if error is None else f"{type(error).__name__}: {str(error).strip()}",
        "traceback": [] if error is None else traceback.format_exception(type(error), error, error.__traceback__),
        "threads": {
            names.get(ident, str(ident)): traceback.format_stack(frame)
            for ident, frame in sys._current_frames().items()
            if ident != threading.get_ident()
        },
    }
    stack_file(path).write_text(json.dumps(where, indent=1))
    return path


def collective_failure_report(error: BaseException) -> str | None:
    """The lines a rank prints when `error` came out of a collective (a timeout or a lost peer); None otherwise.

    They name the rank, its host and the last collectives it entered (the one it waited in is the newest), and
    where the flight-recorder dump went; `python -m osp_launch.hang` over a job's dumps names the rank the others
    waited for (`torchfrtrace <folder>` reads the NCCL dumps too).
    """
    message = str(error).lower()
    distributed_error = (
        isinstance(error, getattr(dist, "DistError", ()))
        or "timed out" in message
        or any(phrase in message for phrase in ("monitoredbarrier", "closed by peer"))
    )
    if not distributed_error:
        return None
    # The job's clean-up may have destroyed the process group before the error reaches the hook; the flight
    # recorder still tells whether this process ever took part in collectives.
    trace = _flight_recorder_trace()
    if not dist.is_initialized() and not (trace and pickle.loads(trace).get("entries")):
        return None
    rank, world = world_rank()
    lines = [f"[rank {rank}/{world} on {socket.gethostname()}] collective failed: {str(error).strip()}"]
    path = dump_flight_recorder(error)
    if path is not None:
        entries = _last_collectives(pickle.loads(path.read_bytes()))
        if entries:
            lines.append(f"[rank {rank}] waiting in collective " + _describe(entries[-1]))
            lines += [f"[rank {rank}]   before it: " + _describe(entry) for entry in reversed(entries[:-1])]
        lines.append(
            f"[rank {rank}] flight recorder dump: {path}, stacks in {stack_file(path).name} (which rank "
            f"the others waited for: python -m osp_launch.hang {path.parent})"
        )
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
