"""Communication ledger: every collective the model and trainer issue, counted per step as (op, group, bytes).

Printable as a table, flattened to `comm/<group>/<op>_bytes` scalars for TensorBoard, and readable in tests.
"""

import contextlib
from dataclasses import dataclass

import torch

# Bytes are what this rank sends to other ranks under the usual bandwidth-optimal algorithms, so they compare
# directly with the formulas in docs/parallelism.md (X: the tensor a rank passes in, G: the group size):
#   all_to_all      input bytes minus the slice the rank keeps                 (X (G-1)/G for equal splits)
#   all_gather      the rank's input, once for each other rank                 (X (G-1))
#   all_reduce      ring all-reduce: reduce-scatter then all-gather            (2 X (G-1)/G)
#   reduce_scatter  full input minus the rank's own output slice               (X (G-1)/G)
OPS = ("all_to_all", "all_gather", "all_reduce", "reduce_scatter")
PHASES = ("forward", "backward", "recompute", "step")


@dataclass
class LedgerEntry:
    """Totals of one kind of collective: phase (forward, backward, recompute, step), op, group, tag."""

    phase: str
    op: str
    group: str
    tag: str
    calls: int = 0
    bytes: int = 0


def _inside_backward() -> bool:
    """True while the autograd engine runs a backward pass (where activation checkpointing recomputes)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def forward_phase() -> str:
    """Phase label of a collective issued from a forward function: "recompute" when checkpointing replays it."""
    return "recompute" if _inside_backward() else "forward"


class CommLedger:
    """Per-process totals of collectives since the last `reset()` (the trainer resets it every step)."""

    def __init__(self):
        self._entries: dict[tuple, LedgerEntry] = {}
        self.enabled = True

    def reset(self) -> None:
        self._entries = {}

    def record(self, op: str, group: str, nbytes: int, tag: str = "", phase: str = "forward") -> None:
        if not self.enabled:
            return
        if op not in OPS or phase not in PHASES:
            raise ValueError(f"ledger: op must be one of {OPS} and phase one of {PHASES}, got {op!r}, {phase!r}")
        key = (phase, op, group, tag)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = LedgerEntry(phase, op, group, tag)
        entry.calls += 1
        entry.bytes += int(nbytes)

    def entries(self, **match) -> list[LedgerEntry]:
        """Entries whose fields equal every given keyword (phase=, op=, group=, tag=), in a stable order."""
        found = [e for e in self._entries.values() if all(getattr(e, k) == v for k, v in match.items())]
        return sorted(found, key=lambda e: (PHASES.index(e.phase), e.group, e.op, e.tag))

    def total_bytes(self, **match) -> int:
        return sum(e.bytes for e in self.entries(**match))

    def calls(self, **match) -> int:
        return sum(e.calls for e in self.entries(**match))

    def scalars(self, prefix: str = "comm") -> dict[str, float]:
        """{'comm/<group>/<op>_bytes': bytes} summed over phases and tags, plus 'comm/total_bytes'."""
        out: dict[str, float] = {}
        for entry in self._entries.values():
            key = f"{prefix}/{entry.group}/{entry.op}_bytes"
            out[key] = out.get(key, 0) + entry.bytes
        if out:
            out[f"{prefix}/total_bytes"] = sum(out.values())
        return out

    def table(self) -> str:
        """Fixed-width table of all entries and the per-phase totals."""
        rows = [("phase", "op", "group", "tag", "calls", "MiB")]
        for entry in self.entries():
            rows.append((entry.phase, entry.op, entry.group, entry.tag, str(entry.calls), f"{entry.bytes / 2**20:.3f}"))
        for phase in PHASES:
            total = self.total_bytes(phase=phase)
            if total:
                rows.append((phase, "total", "", "", str(self.calls(phase=phase)), f"{total / 2**20:.3f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


_LEDGER = CommLedger()


def ledger() -> CommLedger:
    """The process-wide ledger that all collectives of osp_megatron record into."""
    return _LEDGER


@contextlib.contextmanager
def recording():
    """Reset the ledger, yield it, and leave its counts for inspection (tests, benchmarks)."""
    _LEDGER.reset()
    yield _LEDGER


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def record_all_to_all(group_name: str, sent_bytes: int, tag: str, phase: str) -> None:
    _LEDGER.record("all_to_all", group_name, sent_bytes, tag, phase)


def record_all_gather(group_name: str, input_bytes: int, size: int, tag: str, phase: str) -> None:
    _LEDGER.record("all_gather", group_name, input_bytes * (size - 1), tag, phase)


def record_all_reduce(group_name: str, input_bytes: int, size: int, tag: str, phase: str) -> None:
    _LEDGER.record("all_reduce", group_name, 2 * input_bytes * (size - 1) // size, tag, phase)


def watch_tensor_parallel_linears(model: torch.nn.Module) -> int:
    """Count megatron-core's tensor-parallel all-reduces with module hooks (no patching of megatron).

    RowParallelLinear all-reduces its output in forward; ColumnParallelLinear all-reduces its input gradient
    in backward (the non-sequence-parallel TP scheme used here). Returns the number of linears watched.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return 0

    def after_row_parallel(module, inputs, output):
        if module.input_is_parallel:
            result = output[0] if isinstance(output, tuple) else output
            record_all_reduce("tensor", tensor_bytes(result), size, "row_parallel_output", forward_phase())

    def before_column_parallel(module, inputs):
        source = inputs[0]
        if torch.is_grad_enabled() and source.requires_grad and not _inside_backward():
            nbytes = tensor_bytes(source)
            source.register_hook(
                lambda grad: record_all_reduce("tensor", nbytes, size, "column_parallel_input_grad", "backward")
            )

    watched = 0
    for module in model.modules():
        if isinstance(module, RowParallelLinear):
            module.register_forward_hook(after_row_parallel)
            watched += 1
        elif isinstance(module, ColumnParallelLinear):
            module.register_forward_pre_hook(before_column_parallel)
            watched += 1
    return watched
