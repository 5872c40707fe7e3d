"""The communication ledger: counts and bytes of every collective match docs/parallelism.md's formulas.

One hidden-state all-to-all per pattern switch, a quarter of a Ulysses layer's bytes at S=4, TensorBoard tags.
"""

import pytest
import torch

from osp_megatron.config.loader import from_dict
from osp_megatron.engine.parallelize import parallelize_dit
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.ledger import CommLedger, recording
from osp_megatron.parallel.state import ParallelConfig, init_distributed

BLOCKS = ["full", "token", "group", "token", "full"]  # two pattern switches, three sparse and two full layers
BATCH, DIM, GRID = 2, 64, (3, 8, 8)  # tiny preset, latent 16x3x16x16
BYTES = 4  # fp32


def test_ledger_counts_tables_and_scalars():
    """record() accumulates calls and bytes per (phase, op, group, tag); scalars sum per group and op."""
    ledger = CommLedger()
    ledger.record("all_to_all", "ssp", 100, "switch")
    ledger.record("all_to_all", "ssp", 100, "switch", "backward")
    ledger.record("all_to_all", "ulysses", 40, "attention")
    ledger.record("all_reduce", "tensor", 8, "sum")
    assert ledger.calls(op="all_to_all") == 3 and ledger.total_bytes(group="ssp") == 200
    assert ledger.scalars() == {
        "comm/ssp/all_to_all_bytes": 200,
        "comm/ulysses/all_to_all_bytes": 40,
        "comm/tensor/all_reduce_bytes": 8,
        "comm/total_bytes": 248,
    }
    table = ledger.table()
    assert "switch" in table and "backward" in table and table.splitlines()[0].split()[:3] == ["phase", "op", "group"]
    with pytest.raises(ValueError, match="op must be one of"):
        ledger.record("broadcast", "ssp", 1)
    ledger.reset()
    assert ledger.entries() == [] and ledger.scalars() == {}


def _forward_backward_ledger(rank, world_size, tensor, ssp, ulysses):
    init_distributed(ParallelConfig(tensor=tensor, ssp=ssp, ulysses=ulysses))
    config = from_dict(
        ModelConfig, {"preset": "tiny", "sparse_ratio": 2, "num_layers": len(BLOCKS), "block_layout": BLOCKS}, "model"
    )
    torch.manual_seed(0)
    model = build_model(config)
    parallelize_dit(model)  # the token layout of these SSP x Ulysses groups
    latents, text = torch.randn(BATCH, 16, 3, 16, 16), torch.randn(BATCH, 32, 32)
    with recording() as ledger:
        model(latents, torch.tensor([10.0, 500.0]), text).square().mean().backward()
    return [(e.phase, e.op, e.group, e.tag, e.calls, e.bytes) for e in ledger.entries()]


def _by(entries, **match):
    keys = ("phase", "op", "group", "tag")
    found = [e for e in entries if all(e[keys.index(k)] == v for k, v in match.items())]
    return sum(e[4] for e in found), sum(e[5] for e in found)


@pytest.mark.slow
@pytest.mark.parametrize("tensor, ssp, ulysses", [(1, 4, 1), (1, 2, 2), (1, 1, 2), (2, 2, 1)])
def test_ledger_matches_the_design_formulas(tensor, ssp, ulysses):
    """Per rank and forward pass: one all-to-all per pattern switch of B N d (S-1)/(S^2 U) elements over the SSP
    group, 4 per full layer of 4 B N d_tp (G-1)/G^2 over all G = S U context ranks, 4 per sparse layer of
    4 B (N/S) d_tp (U-1)/U^2 over the U Ulysses ranks (they share N/S tokens), one output all-gather; the
    backward pass mirrors every all-to-all once."""
    entries = run_on_ranks(_forward_backward_ledger, tensor * ssp * ulysses, tensor, ssp, ulysses)[0]
    tokens = GRID[0] * GRID[1] * GRID[2]
    context, dim_tp = ssp * ulysses, DIM // tensor
    full_layers, sparse_layers, switches = BLOCKS.count("full"), len(BLOCKS) - BLOCKS.count("full"), 2

    def ulysses_layer(group, group_tokens=tokens):
        return 4 * BATCH * group_tokens * dim_tp * (group - 1) * BYTES // group**2

    switch = BATCH * tokens * DIM * (ssp - 1) * BYTES // (ssp**2 * ulysses)
    calls, nbytes = _by(entries, phase="forward", tag="switch")
    assert (calls, nbytes) == ((switches, switches * switch) if ssp > 1 else (0, 0))
    assert _by(entries, phase="backward", tag="switch") == (calls, nbytes)
    assert _by(entries, phase="forward", group="context", tag="attention") == (
        4 * full_layers,
        full_layers * ulysses_layer(context),
    )
    assert _by(entries, phase="forward", group="ulysses", tag="attention") == (
        (4 * sparse_layers, sparse_layers * ulysses_layer(ulysses, tokens // ssp)) if ulysses > 1 else (0, 0)
    )
    assert _by(entries, phase="forward", op="all_gather", group="context") == (
        1,
        BATCH * tokens // context * DIM * BYTES * (context - 1),
    )
    if ssp == 4 and ulysses == 1 and tensor == 1:
        # SSP's point (docs/parallelism.md): a pattern switch moves a quarter of a Ulysses layer's bytes.
        assert nbytes / switches == ulysses_layer(context) / 4
    if tensor > 1:
        assert _by(entries, phase="forward", op="all_reduce", group="tensor")[0] > 0
        assert _by(entries, phase="backward", op="all_reduce", group="tensor")[0] > 0


def test_comm_scalars_reach_tensorboard(tmp_path):
    """MetricsLogger writes the ledger's comm/<group>/<op>_bytes keys under their own TensorBoard tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from osp_megatron.engine.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=1, start_step=0, enabled=True, progress=False)
    logger.log(1, {"loss": 1.0, "comm/ssp/all_to_all_bytes": 4096.0})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "comm/ssp/all_to_all_bytes"} <= set(events.Tags()["scalars"])
