"""Differentiable collectives of sequence parallelism: Ulysses head/sequence all-to-alls, token redistribution.

Each records itself in the communication ledger; its backward issues the adjoint collective (also recorded).
"""

import torch
import torch.distributed as dist

from osp_megatron.parallel.ledger import (
    forward_phase,
    record_all_gather,
    record_all_to_all,
    tensor_bytes,
)


# -- Ulysses: sequence <-> heads -----------------------------------------------------------------------------
def _sequence_to_heads(x, group, runs):
    """[B, runs * n, H, D] (this rank's chunk of each run) -> [B, runs * G * n, H/G, D] (whole runs, H/G heads)."""
    size = dist.get_world_size(group)
    batch, tokens, heads, head_dim = x.shape
    send = x.reshape(batch, runs, tokens // runs, size, heads // size, head_dim).permute(3, 0, 1, 2, 4, 5)
    send = send.contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[j]: rank j's chunk of every run, for this rank's head slice; chunks of a run go in rank order.
    return received.permute(1, 2, 0, 3, 4, 5).reshape(
        batch, runs * size * (tokens // runs), heads // size, head_dim
    ), send


def _heads_to_sequence(y, group, runs):
    """Inverse of _sequence_to_heads: [B, runs * G * n, H/G, D] -> [B, runs * n, H, D]."""
    size = dist.get_world_size(group)
    batch, tokens, heads, head_dim = y.shape
    chunk = tokens // (runs * size)
    send = y.reshape(batch, runs, size, chunk, heads, head_dim).permute(2, 0, 1, 3, 4, 5).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[j]: this rank's chunk of every run, for rank j's head slice; head slices go in rank order.
    return received.permute(1, 2, 3, 0, 4, 5).reshape(batch, runs * chunk, size * heads, head_dim), send


class _UlyssesAllToAll(torch.autograd.Function):
    """sequence_to_heads in forward (to_heads=True) or heads_to_sequence; the other one in backward."""

    @staticmethod
    def forward(ctx, x, group, group_name, runs, to_heads, tag):
        ctx.args = (group, group_name, runs, to_heads, tag)
        move = _sequence_to_heads if to_heads else _heads_to_sequence
        out, send = move(x, group, runs)
        size = dist.get_world_size(group)
        record_all_to_all(group_name, tensor_bytes(send) * (size - 1) // size, tag, forward_phase())
        return out

    @staticmethod
    def backward(ctx, grad):
        group, group_name, runs, to_heads, tag = ctx.args
        move = _heads_to_sequence if to_heads else _sequence_to_heads
        out, send = move(grad.contiguous(), group, runs)
        size = dist.get_world_size(group)
        record_all_to_all(group_name, tensor_bytes(send) * (size - 1) // size, tag, "backward")
        return out, None, None, None, None, None


def sequence_to_heads(x, group, group_name: str, runs: int = 1, tag: str = "attention"):
    """Ulysses before attention: gather the sequence, scatter the heads over `group`.

    x [B, runs * n, H, D] holds, for each of `runs` independent sequences (Skiparse subsequences, or 1 for a
    full layer), this rank's n consecutive tokens. Returns [B, runs * G * n, H/G, D]: every run whole (ranks'
    chunks in group-rank order) for the group rank's slice of H/G heads.
    """
    return _UlyssesAllToAll.apply(x, group, group_name, runs, True, tag)


def heads_to_sequence(y, group, group_name: str, runs: int = 1, tag: str = "attention"):
    """Ulysses after attention: the inverse of sequence_to_heads (heads gathered, sequence scattered back)."""
    return _UlyssesAllToAll.apply(y, group, group_name, runs, False, tag)


# -- token redistribution between layouts ---------------------------------------------------------------------
class _AllToAllRows(torch.autograd.Function):
    """Rows (dim 0) sent in consecutive blocks of `send_sizes` to the group's ranks; received likewise."""

    @staticmethod
    def forward(ctx, rows, group, group_name, send_sizes, receive_sizes, tag):
        ctx.args = (group, group_name, send_sizes, receive_sizes, tag)
        return _all_to_all_rows(rows, group, group_name, send_sizes, receive_sizes, tag, forward_phase())

    @staticmethod
    def backward(ctx, grad):
        group, group_name, send_sizes, receive_sizes, tag = ctx.args
        out = _all_to_all_rows(grad.contiguous(), group, group_name, receive_sizes, send_sizes, tag, "backward")
        return out, None, None, None, None, None


def _all_to_all_rows(rows, group, group_name, send_sizes, receive_sizes, tag, phase):
    received = rows.new_empty((sum(receive_sizes), *rows.shape[1:]))
    dist.all_to_all_single(received, rows, list(receive_sizes), list(send_sizes), group=group)
    row_bytes = tensor_bytes(rows) // max(rows.shape[0], 1)
    kept = send_sizes[dist.get_rank(group)]
    record_all_to_all(group_name, row_bytes * (rows.shape[0] - kept), tag, phase)
    return received


def all_to_all_rows(rows, group, group_name: str, send_sizes, receive_sizes, tag: str = "switch"):
    """Differentiable all-to-all of rows [n, ...]: block i of `send_sizes` goes to group rank i."""
    return _AllToAllRows.apply(rows.contiguous(), group, group_name, tuple(send_sizes), tuple(receive_sizes), tag)


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; older releases lack it.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherReplicatedOutput(torch.autograd.Function):
    """All-gather of row blocks whose result every rank of the group consumes identically.

    The exact adjoint of an all-gather is a reduce-scatter (sum) of the output gradients. When every rank
    computes the same loss from the same gathered tensor those G gradients are identical, so the sum is
    G x this rank's own block: no communication is needed in backward. Gradients upstream of the gather are
    then G times this rank's share and the trainer averages over the context-parallel ranks (together with
    data parallel), which yields exactly the single-rank gradient (docs/parallelism.md, "Gradients").
    """

    @staticmethod
    def forward(ctx, rows, group, group_name, tag):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.block, ctx.size, ctx.rank = rows.shape[0], size, rank
        gathered = rows.new_empty((size * rows.shape[0], *rows.shape[1:]))
        _all_gather_single(gathered, rows, group=group)
        record_all_gather(group_name, tensor_bytes(rows), size, tag, forward_phase())
        return gathered

    @staticmethod
    def backward(ctx, grad):
        own = grad[ctx.rank * ctx.block : (ctx.rank + 1) * ctx.block]
        return own * ctx.size, None, None, None


def gather_replicated_output(rows, group, group_name: str, tag: str = "exit"):
    """All-gather rows [n, ...] over `group` -> [G * n, ...] in group-rank order, for a replicated loss."""
    return _GatherReplicatedOutput.apply(rows.contiguous(), group, group_name, tag)
