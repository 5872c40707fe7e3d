"""The memory model: parameter counts, bytes per parameter by sharding, phase arithmetic, measured block bytes,
and `osp-train --estimate-memory`."""

import dataclasses

import pytest

from osp_megatron.config.loader import from_dict
from osp_megatron.models.config import PRESETS, ModelConfig
from osp_megatron.training import cli
from osp_megatron.training.activation_bytes import measure_in_subprocess, run_requests
from osp_megatron.training.activation_profile import request_for
from osp_megatron.training.memory import Layout, Run, _state, count_parameters, estimate

WAN_14B = from_dict(ModelConfig, {"preset": "wan-14b", "sparse_ratio": 2}, "model")
TINY = from_dict(ModelConfig, {"preset": "tiny"}, "model")


def test_parameter_counts_follow_the_architecture():
    """Meta-device counts equal Wan's formula: 14.29 B for wan-14b; tensor parallelism splits all but the
    modulation table, the cross-attention norm, the row-parallel biases and everything outside the blocks."""
    two_blocks = dataclasses.replace(WAN_14B, num_layers=2)  # the same blocks; building 40 takes long
    d, f = WAN_14B.dim, WAN_14B.ffn_dim
    attention = 4 * d * d + 4 * d + 2 * d  # q, k, v, o weights and biases, q and k norms
    block = 2 * attention + 2 * d * f + f + d + 2 * d + 6 * d  # + FFN, norm2, modulation table
    counts = count_parameters(two_blocks)
    assert counts.block == block and counts.total == 2 * block + counts.outside
    assert round((WAN_14B.num_layers * block + counts.outside) / 1e9, 2) == 14.29
    replicated = 6 * d + 2 * d + 2 * d + d  # modulation, norm2, two output-projection biases, fc2 bias
    assert count_parameters(two_blocks, tensor=4).block == (block - replicated) // 4 + replicated
    assert count_parameters(two_blocks, tensor=4).outside == counts.outside


@pytest.mark.parametrize(
    "layout, ema, expected",
    [
        (Layout(), True, 20.0),  # fp32 weights 4, gradients 4, AdamW 8, EMA 4
        (Layout(ema_on_cpu=True), True, 16.0),
        (Layout(data=8, fsdp=True), True, 2.5),
        (Layout(data=2, ssp=2, fsdp=True), False, 4.0),  # FSDP shards over data x SSP ranks
        (Layout(data=8, fsdp=True, fsdp_offload=True, ema_on_cpu=True), True, 0.0),
        (Layout(data=8, fsdp=True, fsdp_offload=True), True, 0.0),  # the EMA follows the shards to the CPU
    ],
)
def test_model_state_bytes_per_parameter(layout, ema, expected):
    """Bytes per parameter of weights, gradients, AdamW moments and EMA for each sharding."""
    model = dataclasses.replace(WAN_14B, num_layers=2)
    run = Run(model=model, latent=(21, 60, 104), ema=ema, layout=layout)
    items, forward, backward = _state(run, count_parameters(model))
    assert sum(items.values()) == pytest.approx(expected)
    if layout.fsdp:  # two bf16 blocks and the float32 root gathered; the backward adds one block's gradients
        counts = count_parameters(model)
        assert forward == 2 * counts.block * 2 + counts.outside * 4
        assert backward == forward + counts.block * (2 + 4)
    else:
        assert forward == backward == 0


def _flat_profile(per_token: float, rise: float) -> dict:
    """A profile whose block keeps `per_token` bytes per token in every mode and rises `rise` per token."""
    line = {"per_token": per_token, "constant": 0.0}
    zero = {"per_token": 0.0, "constant": 0.0}
    profile = {name: line for name in ("block", "block_full", "block_selective")}
    profile.update(
        {name: zero for name in ("block_weights", "block_weights_full", "block_weights_selective", "outside")}
    )
    profile.update(rise_block=[[rise, 0.0]], rise_outside=[[0.0, 0.0]])
    return profile


def test_phase_arithmetic():
    """The backward peak is model state + every block's kept bytes + the last block's rise (gradients still
    unallocated), and the optimizer step holds state + all gradients."""
    run = Run(model=TINY, latent=(3, 16, 16), ema=False)
    profiles = {request.key(): _flat_profile(1000.0, 300.0) for request in run_requests(run).values()}
    result = estimate(run, profiles)
    counts, tokens = result.counts, run.local_tokens
    state = 16 * counts.total  # fp32 weights, gradients, two moments: gradients are counted in the phases
    state_without_grads = 12 * counts.total
    kept = 1000.0 * tokens
    head = state_without_grads + 4 * counts.outside + TINY.num_layers * kept
    blocks = state_without_grads + max(
        index * kept + kept + 300.0 * tokens + 4 * (counts.outside + counts.block * (TINY.num_layers - index))
        for index in range(TINY.num_layers)
    )
    assert result.phases["backward (head)"] == pytest.approx(head)
    assert result.phases["backward (blocks)"] == pytest.approx(blocks)
    assert result.phases["optimizer step"] == pytest.approx(state + 4 * TINY.ffn_dim * TINY.dim)
    sharded = estimate(dataclasses.replace(run, layout=Layout(data=4, fsdp=True)), profiles)
    assert sharded.phases["optimizer step"] < result.phases["optimizer step"]


@pytest.fixture(scope="module")
def tiny_profiles():
    """Measured (eager, bf16) profiles of the tiny model's full-attention block at tensor 1 and 2."""
    requests = [request_for(TINY, "full", False, tensor, "bf16", "none", compiled=False) for tensor in (1, 2)]
    return dict(zip((1, 2), measure_in_subprocess(requests)))


@pytest.mark.slow
def test_measured_block_bytes(tiny_profiles):
    """Full recomputation keeps exactly the bf16 block input (2 bytes per channel and token); selective also
    the attention core's q, k, v, output (2 bytes each, split over tensor-parallel ranks) and float32 softmax
    statistics per head; no recomputation keeps more; and the embeddings, head and loss keep something."""
    dim, heads = TINY.dim, TINY.num_heads
    for tensor, profile in tiny_profiles.items():
        assert profile["block_full"] == {"per_token": 2 * dim, "constant": 0}
        core = (4 * 2 * dim + 4 * heads) / tensor
        assert profile["block_selective"]["per_token"] == 2 * dim + core
        assert profile["block"]["per_token"] > profile["block_selective"]["per_token"]
        assert profile["block_weights"]["constant"] > 0 and profile["block_weights_full"]["constant"] == 0
        assert profile["outside"]["per_token"] > 0
        assert max(line[0] for line in profile["rise_block"]) > 0
    assert tiny_profiles[2]["block"]["per_token"] < tiny_profiles[1]["block"]["per_token"]


@pytest.mark.slow
def test_estimate_memory_cli(capsys, monkeypatch, tmp_path):
    """osp-train --estimate-memory prints model state, activations and the peak without starting anything."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["--estimate-memory", "model.activation_checkpointing=selective"]) == 0
    out = capsys.readouterr().out
    for text in ("B/param", "AdamW moments", "kept (selective", "<- peak", "fits a 139 GiB GPU"):
        assert text in out, out


@pytest.mark.parametrize("preset, parameters", [("wan-1.3b", "1.42 B"), ("wan-14b", "14.29 B")])
def test_print_config_and_estimate_memory_take_a_preset_from_the_command_line(
    preset, parameters, capsys, monkeypatch, tmp_path
):
    """`osp-train --print-config model.preset=X` and `--estimate-memory model.preset=X` over the packaged tiny
    config resolve and size that preset, not the tiny config's dimensions."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["--print-config", f"model.preset={preset}"]) == 0
    printed = capsys.readouterr().out
    assert f"preset: {preset}" in printed and f"dim: {PRESETS[preset]['dim']}" in printed
    assert cli.main(["--estimate-memory", f"model.preset={preset}"]) == 0
    assert f"{preset} ({parameters} parameters)" in capsys.readouterr().out


def test_wan13b_480p_example_fits_one_h200(capsys, monkeypatch, tmp_path):
    """examples/train_wan13b_480p.yaml: --estimate-memory sizes wan-1.3b at 480P with full recomputation, under
    the 139 GiB of an H200 (measured: 33.9 GB, docs/memory.md)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["--config", "examples/train_wan13b_480p.yaml", "--estimate-memory"]) == 0
    out = capsys.readouterr().out
    assert "wan-1.3b (1.42 B parameters)" in out and "tokens 21x30x52 = 32,760" in out
    assert "fits a 139 GiB GPU" in out
