"""Sequence parallelism of the DiT: SSP (whole Skiparse subsequences per rank), Ulysses inside them and in full layers.

`SequenceParallelTokenLayout` has LocalTokenLayout's interface; hidden states move only in enter, switch and exit.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from osp_megatron.attention.context import AttentionContext
from osp_megatron.attention.rope import rope_tables
from osp_megatron.attention.skiparse import padded_grid, sparse_key_mask, to_sparse_layout
from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel.collectives import all_to_all_rows, gather_replicated_output
from osp_megatron.parallel.layout import SPARSE_KINDS, key_runs_on

ROW_MAJOR = "row_major"  # the order of full-only models: row-major tokens cut into equal consecutive pieces


@dataclass
class SequenceParallelContext(AttentionContext):
    """AttentionContext plus the group whose ranks' tokens the attention core gathers (Ulysses); None: local."""

    sequence_group: object = None
    group_name: str = ""


# -- start-up checks -----------------------------------------------------------------------------------------
def _divisors(number: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(number, limit) + 1) if number % d == 0]


def check_heads(num_heads: int, tensor: int, ssp: int, ulysses: int, full_layers: bool, sparse_layers: bool):
    """Heads of each tensor-parallel rank are scattered over U ranks (sparse) or all S x U ranks (full)."""
    if sparse_layers and num_heads % (tensor * ulysses):
        raise ConfigError(
            f"model.num_heads={num_heads} is not divisible by parallel.tensor x parallel.ulysses = {tensor} x "
            f"{ulysses} = {tensor * ulysses}: Skiparse layers scatter each tensor-parallel rank's heads over the "
            f"Ulysses ranks; choose tensor x ulysses among {_divisors(num_heads)}"
        )
    if full_layers and num_heads % (tensor * ssp * ulysses):
        raise ConfigError(
            f"model.num_heads={num_heads} is not divisible by parallel.tensor x parallel.ssp x parallel.ulysses = "
            f"{tensor} x {ssp} x {ulysses} = {tensor * ssp * ulysses}: full-attention layers scatter each "
            f"tensor-parallel rank's heads over all ssp x ulysses ranks; choose tensor x ssp x ulysses among "
            f"{_divisors(num_heads)}"
        )


def check_grid(grid, sparse_ratio: int, ssp: int, ulysses: int, uses_sparse: bool, source: str = "token grid"):
    """Refuse a token grid that cannot be split over the S x U sequence-parallel ranks, saying what would work."""
    frames, height, width = grid
    context = ssp * ulysses
    if not uses_sparse:
        tokens = frames * height * width
        if tokens % context:
            raise ConfigError(
                f"the {source} {frames}x{height}x{width} = {tokens} tokens cannot be split evenly over parallel.ssp "
                f"x parallel.ulysses = {ssp} x {ulysses} = {context} ranks; use a product dividing {tokens} "
                f"(e.g. {_divisors(tokens, 16)}) or change the latent size"
            )
        return
    count = sparse_ratio * sparse_ratio
    if count % ssp:
        raise ConfigError(
            f"parallel.ssp={ssp} must divide model.sparse_ratio^2 = {count}: each SSP rank holds whole Skiparse "
            f"subsequences; use parallel.ssp in {_divisors(count)}"
        )
    _, padded_height, padded_width = padded_grid(tuple(grid), sparse_ratio)
    length = frames * padded_height * padded_width // count
    if length % ulysses:
        raise ConfigError(
            f"the {source} {frames}x{height}x{width} (padded to {frames}x{padded_height}x{padded_width}) gives "
            f"Skiparse subsequences of {length} tokens, which parallel.ulysses={ulysses} ranks cannot split evenly; "
            f"use parallel.ulysses in {_divisors(length, 16)} or change the latent size"
        )


def uses_sparse_order(sparse_ratio: int, block_kinds) -> bool:
    return sparse_ratio > 1 and (block_kinds is None or any(kind != "full" for kind in block_kinds))


def check_sequence_parallel_layout(
    model_config, grid, tensor: int, ssp: int, ulysses: int, source: str = "token grid"
) -> None:
    """Everything a (tensor, ssp, ulysses) layout needs from the model and the token grid, as ConfigErrors."""
    kinds = model_config.block_kinds()
    sparse = uses_sparse_order(model_config.sparse_ratio, kinds)
    check_grid(grid, model_config.sparse_ratio, ssp, ulysses, sparse, source)
    check_heads(model_config.num_heads, tensor, ssp, ulysses, full_layers="full" in kinds, sparse_layers=sparse)


# -- global token orders and the tables derived from them ----------------------------------------------------
# An order assigns every token of the padded grid (id t*Hp*Wp + h*Wp + w) to a context rank c = s*U + u and
# a slot there: a LongTensor [S*U, n] of ids. Sparse orders give rank (s, u) subsequences s*P^2/S ... of
# that pattern, and of each the u-th of U equal consecutive chunks, so Ulysses inside a subsequence only
# concatenates the chunks of the U ranks in rank order.
def _order_ids(grid, sparse_ratio, ssp, ulysses, order):
    context = ssp * ulysses
    if order == ROW_MAJOR:
        frames, height, width = grid
        return torch.arange(frames * height * width).reshape(context, -1)
    padded = padded_grid(grid, sparse_ratio)
    ids = torch.arange(padded[0] * padded[1] * padded[2]).reshape(1, -1)
    sparse = to_sparse_layout(ids, padded, sparse_ratio, order)  # [P^2, L]; padded grid: no further padding
    count, length = sparse.shape
    per_rank = sparse.reshape(ssp, count // ssp, ulysses, length // ulysses).permute(0, 2, 1, 3)
    return per_rank.reshape(context, -1)


def _row_major_index(ids, grid, sparse_ratio):
    """Row-major position in the real grid of each padded-grid id, or T*H*W for padding (a zero row)."""
    frames, height, width = grid
    _, padded_height, padded_width = padded_grid(grid, sparse_ratio)
    t, h, w = ids // (padded_height * padded_width), (ids // padded_width) % padded_height, ids % padded_width
    real = (h < height) & (w < width)
    return torch.where(real, (t * height + h) * width + w, torch.full_like(ids, frames * height * width))


@dataclass
class OrderTables:
    """What one rank needs to hold tokens in one order: its slice, the output gather, RoPE and key runs."""

    ids: torch.Tensor  # [S*U, n] padded-grid ids of every rank (CPU)
    local_index: torch.Tensor  # [n] row-major index of each local token, T*H*W for padding
    holds_padding: bool  # whether local_index points at the padding row T*H*W
    exit_index: torch.Tensor  # [T*H*W] position of each row-major token among all ranks' tokens in rank order
    rope: tuple  # (cos, sin) [1, n, 1, head_dim] of the local tokens
    full_key_runs: list | None  # full layers over all ranks' tokens: the real keys, None when unpadded
    sparse_key_runs: list | None  # the local subsequences' real keys (sparse orders), None when unpadded


@dataclass
class SwitchPlan:
    """One redistribution between two orders: rows to send per peer, then the order of the received rows."""

    group_name: str | None  # "ssp", "ulysses", "context", or None when every token stays on its rank
    send_index: torch.Tensor
    send_sizes: tuple
    receive_sizes: tuple
    receive_order: torch.Tensor


class SequencePlan:
    """Index tables of one (grid, P, S, U, rank) on one device, built on first use and cached."""

    def __init__(self, grid, sparse_ratio, ssp, ulysses, context_rank, head_dim, rope_theta, device):
        self.grid, self.ratio, self.ssp, self.ulysses = tuple(grid), sparse_ratio, ssp, ulysses
        self.rank, self.head_dim, self.theta, self.device = context_rank, head_dim, rope_theta, device
        self._tables: dict[str, OrderTables] = {}
        self._switches: dict[tuple, SwitchPlan] = {}

    def tables(self, order: str) -> OrderTables:
        if order not in self._tables:
            self._tables[order] = self._build_tables(order)
        return self._tables[order]

    def _build_tables(self, order):
        frames, height, width = self.grid
        tokens = frames * height * width
        ids = _order_ids(self.grid, self.ratio, self.ssp, self.ulysses, order)
        padding_ratio = self.ratio if order in SPARSE_KINDS else 1  # row-major ids index the unpadded grid
        local_index = _row_major_index(ids[self.rank], self.grid, padding_ratio)
        every = _row_major_index(ids.flatten(), self.grid, padding_ratio)
        real = every < tokens
        exit_index = torch.empty(tokens, dtype=torch.long)
        exit_index[every[real]] = real.nonzero().flatten()
        full_key_runs = None if bool(real.all()) else [(0, 1, real.nonzero().flatten().to(self.device))]
        sparse_key_runs = None
        if order in SPARSE_KINDS:
            count = self.ratio**2
            held = count // self.ssp
            first = (self.rank // self.ulysses) * held
            sparse_key_runs = key_runs_on(
                sparse_key_mask(self.grid, self.ratio, order)[first : first + held], self.device
            )
        cos, sin = rope_tables(self.grid, self.head_dim, self.theta)
        rope = tuple(F.pad(t, (0, 0, 0, 0, 0, 1)).index_select(1, local_index).to(self.device) for t in (cos, sin))
        return OrderTables(
            ids,
            local_index.to(self.device),
            bool((local_index == tokens).any()),
            exit_index.to(self.device),
            rope,
            full_key_runs,
            sparse_key_runs,
        )

    def switch(self, source: str, target: str) -> SwitchPlan:
        if (source, target) not in self._switches:
            self._switches[(source, target)] = self._build_switch(source, target)
        return self._switches[(source, target)]

    def _build_switch(self, source, target):
        old, new = self.tables(source).ids, self.tables(target).ids
        context, per_rank = old.shape
        total = int(old.max()) + 1
        owner, slot = torch.empty(total, dtype=torch.long), torch.empty(total, dtype=torch.long)
        owner[old.flatten()] = torch.arange(context).repeat_interleave(per_rank)
        slot[old.flatten()] = torch.arange(per_rank).repeat(context)
        destination = torch.empty(total, dtype=torch.long)
        destination[new.flatten()] = torch.arange(context).repeat_interleave(per_rank)
        ulysses, me = self.ulysses, self.rank
        src, dst = owner[old.flatten()], destination[old.flatten()]
        # The smallest group that holds every transfer; token <-> group switches stay in the SSP group when
        # the Ulysses chunks cut whole (t, h-block) rows, as they do whenever U divides T * Hp / P^2.
        if bool((src == dst).all()):
            name, members = None, [me]
        elif bool((src % ulysses == dst % ulysses).all()):
            name, members = "ssp", [s * ulysses + me % ulysses for s in range(self.ssp)]
        elif bool((src // ulysses == dst // ulysses).all()):
            name, members = "ulysses", [(me // ulysses) * ulysses + u for u in range(ulysses)]
        else:
            name, members = "context", list(range(context))
        send_index, send_sizes = [], []
        for peer in members:
            wanted = new[peer]
            wanted = wanted[owner[wanted] == me]  # in the peer's new order
            send_index.append(slot[wanted])
            send_sizes.append(int(wanted.numel()))
        source_of_mine = owner[new[me]]
        positions, receive_sizes = [], []
        for peer in members:
            from_peer = (source_of_mine == peer).nonzero().flatten()
            positions.append(from_peer)
            receive_sizes.append(int(from_peer.numel()))
        receive_order = torch.argsort(torch.cat(positions))
        return SwitchPlan(
            name,
            torch.cat(send_index).to(self.device),
            tuple(send_sizes),
            tuple(receive_sizes),
            receive_order.to(self.device),
        )


@functools.lru_cache(maxsize=16)
def sequence_plan(grid, sparse_ratio, ssp, ulysses, context_rank, head_dim, rope_theta, device) -> SequencePlan:
    return SequencePlan(grid, sparse_ratio, ssp, ulysses, context_rank, head_dim, rope_theta, device)


# -- the layout ------------------------------------------------------------------------------------------------
class SequenceParallelTokenLayout:
    """Tokens of each sample spread over the S x U context-parallel ranks (see docs/parallelism.md).

    Sparse kinds: rank (s, u) holds P^2/S whole subsequences of the pattern, the u-th chunk of each;
    attention needs no communication for U = 1 and Ulysses over the U ranks otherwise. A token <-> group
    switch is one all-to-all of the hidden states over the SSP group. Full layers keep whatever order the
    tokens arrive in (attention is permutation-equivariant, RoPE travels with the tokens) and run Ulysses
    over all S x U ranks, with padded keys left out. Full-only models cut the row-major sequence evenly.
    `enter` takes this rank's tokens of the (replicated) patch embedding; `exit` all-gathers the output.
    """

    def __init__(
        self,
        grid,
        sparse_ratio: int,
        head_dim: int,
        rope_theta: float,
        device,
        backend="auto",
        *,
        groups,
        block_kinds=None,
    ):
        self.grid, self.ratio, self.backend, self.groups = tuple(grid), sparse_ratio, backend, groups
        ssp, ulysses = groups.ssp_size, groups.ulysses_size
        self.sparse = uses_sparse_order(sparse_ratio, block_kinds)
        check_grid(self.grid, sparse_ratio, ssp, ulysses, self.sparse)
        self.plan = sequence_plan(
            self.grid, sparse_ratio, ssp, ulysses, groups.context_rank, head_dim, rope_theta, torch.device(device)
        )
        first_sparse = next((kind for kind in block_kinds or () if kind in SPARSE_KINDS), SPARSE_KINDS[0])
        # Full layers of a hybrid model run in the order of the neighbouring sparse layers, so the switch
        # between them is free; the first full layers take the order of the first sparse layer.
        self._full_order = first_sparse if self.sparse else ROW_MAJOR

    def _order(self, kind: str) -> str:
        if kind == "full":
            return self._full_order
        if not self.sparse:
            raise ValueError(f"layout kind {kind!r} needs a hybrid model (sparse_ratio > 1 with sparse blocks)")
        return kind

    # -- token order (the only places hidden states are communicated) ----------------------------------------
    def enter(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Replicated patch embedding [B, T*H*W, dim] -> this rank's tokens [B, n, dim] (padding as zeros)."""
        tables = self.plan.tables(self._order(kind))
        if tables.holds_padding:  # a zero row for the padded positions to read
            x = F.pad(x, (0, 0, 0, 1))
        return x.index_select(1, tables.local_index)

    def switch(self, x: torch.Tensor, from_kind: str, to_kind: str) -> torch.Tensor:
        source = self._order(from_kind)
        if to_kind == "full":
            self._full_order = source
            return x
        if source == to_kind:
            return x
        plan = self.plan.switch(source, to_kind)
        rows = x.movedim(1, 0).index_select(0, plan.send_index)
        if plan.group_name is not None:
            group = {"ssp": self.groups.ssp, "ulysses": self.groups.ulysses, "context": self.groups.context}
            rows = all_to_all_rows(
                rows, group[plan.group_name], plan.group_name, plan.send_sizes, plan.receive_sizes, tag="switch"
            )
        return rows.index_select(0, plan.receive_order).movedim(0, 1)

    def exit(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """This rank's tokens -> the whole output [B, T*H*W, dim] in row-major order, on every context rank."""
        tables = self.plan.tables(self._order(kind))
        rows = x.movedim(1, 0)
        if self.groups.context is not None:
            rows = gather_replicated_output(rows, self.groups.context, "context", tag="exit")
        return rows.index_select(0, tables.exit_index).movedim(0, 1)

    # -- per-layout side tables ----------------------------------------------------------------------------
    def rope(self, kind: str):
        return self.plan.tables(self._order(kind)).rope

    def attention_context(self, kind: str) -> SequenceParallelContext:
        tables = self.plan.tables(self._order(kind))
        if kind == "full":
            return SequenceParallelContext(
                subsequences=1,
                key_runs=tables.full_key_runs,
                backend=self.backend,
                sequence_group=self.groups.context,
                group_name="context",
            )
        return SequenceParallelContext(
            subsequences=self.ratio**2 // self.groups.ssp_size,
            key_runs=tables.sparse_key_runs,
            backend=self.backend,
            sequence_group=self.groups.ulysses,
            group_name="ulysses",
        )
