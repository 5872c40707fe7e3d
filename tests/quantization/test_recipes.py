"""Formats, recipes, per-tensor scale bookkeeping, checkpoints of scales and QuantConfig validation."""

import pytest
import torch
import torch.distributed as dist

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.quantization import (
    E4M3,
    E5M2,
    HIF8,
    CurrentScaling,
    DelayedScaling,
    HiF8Recipe,
    ModulesConfig,
    QuantConfig,
    TensorScaler,
    hif8_round,
)


def test_fp8_formats_round_like_torch_float8_and_saturate():
    """E4M3/E5M2 qdq equal the torch.float8 casts in range and clamp to +-448 / +-57344 outside."""
    x = torch.randn(4096) * 100
    assert torch.equal(E4M3.qdq(x.clamp(-448, 448)), x.clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert torch.equal(E5M2.qdq(x), x.to(torch.float8_e5m2).float())
    big = torch.tensor([1e6, -1e6, float("inf")])
    assert E4M3.qdq(big).tolist() == [448.0, -448.0, 448.0]
    assert E5M2.qdq(big).tolist() == [57344.0, -57344.0, 57344.0]
    assert torch.isnan(E4M3.qdq(torch.tensor([float("nan")]))).all()
    assert (E4M3.max_value, E5M2.max_value, HIF8.max_value) == (448.0, 57344.0, 32768.0)


def test_hif8_format_saturates():
    """HiF8 qdq is hif8_round with saturation at 2^15."""
    x = torch.tensor([1.3, 50000.0, -float("inf")])
    assert HIF8.qdq(x).tolist() == hif8_round(x, saturate=True).tolist() == [1.25, 32768.0, -32768.0]


def test_recipe_formats_and_targets():
    """Hybrid uses E4M3 forward / E5M2 backward at their maxima; HiF8 scales to 15 and 224."""
    hybrid = CurrentScaling(format="hybrid")
    assert hybrid.format_for("input") is E4M3 and hybrid.format_for("grad_output") is E5M2
    assert hybrid.target_for("weight") == 448.0 and hybrid.target_for("grad_output") == 57344.0
    hif8 = HiF8Recipe()
    assert hif8.format_for("weight") is HIF8
    assert (hif8.target_for("input"), hif8.target_for("weight"), hif8.target_for("grad_output")) == (15, 15, 224)
    custom = HiF8Recipe(forward_target=8.0)
    assert custom.target_for("input") == 8.0 and custom.target_for("grad_output") == 224.0


def test_current_scaling_uses_the_amax_of_each_tensor():
    """Current scaling: scale = target / amax of the tensor being quantized, every call."""
    scaler = HiF8Recipe().make_scaler("input")
    for amax in (2.0, 0.5, 8.0):
        x = torch.tensor([amax, -amax / 3])
        assert scaler.compute_scale(x).item() == pytest.approx(15.0 / amax)
    x = torch.randn(100)
    scale = 15.0 / x.abs().max()
    expected = hif8_round(x * scale, saturate=True) * scale.reciprocal()
    assert torch.allclose(scaler.quantize_dequantize(x), expected, rtol=0, atol=0)


def test_margin_divides_the_scale_by_a_power_of_two():
    """margin m gives scale = target / (amax * 2^m)."""
    scaler = CurrentScaling(format="e4m3", margin=2).make_scaler("weight")
    assert scaler.compute_scale(torch.tensor([7.0])).item() == pytest.approx(448.0 / (7.0 * 4))


def test_delayed_scaling_history_rolls_and_uses_past_amaxes():
    """Delayed scaling quantizes with the scale of earlier amaxes; the newest amax sits at index 0."""
    recipe = DelayedScaling(format="e4m3", amax_history_len=3, amax_compute_algo="max")
    scaler = recipe.make_scaler("input")
    amaxes = [4.0, 2.0, 1.0, 0.5, 8.0]
    used = [scaler.compute_scale(torch.tensor([a])).item() for a in amaxes]
    # First call has no history and scales from itself; later calls use max of the last 3 amaxes.
    assert used == pytest.approx([448 / 4, 448 / 4, 448 / 4, 448 / 4, 448 / 2])
    assert scaler.amax_history.tolist() == [8.0, 0.5, 1.0]
    assert scaler.scale.item() == pytest.approx(448 / 8)


def test_delayed_most_recent_follows_the_last_amax():
    """amax_compute_algo most_recent: each call uses the previous call's amax."""
    scaler = DelayedScaling(format="e4m3", amax_history_len=4, amax_compute_algo="most_recent").make_scaler("input")
    used = [scaler.compute_scale(torch.tensor([a])).item() for a in (4.0, 2.0, 1.0)]
    assert used == pytest.approx([448 / 4, 448 / 4, 448 / 2])


def test_non_finite_or_zero_amax_keeps_the_previous_scale():
    """An overflowing (Inf/NaN) or all-zero tensor neither changes the scale nor poisons the history."""
    scaler = DelayedScaling(format="e4m3", amax_history_len=2).make_scaler("grad_output")
    scaler.compute_scale(torch.tensor([2.0]))
    for bad in (float("inf"), float("nan"), 0.0):
        scaler.compute_scale(torch.tensor([bad]))
        assert scaler.scale.item() == pytest.approx(448.0 / 2)
    assert scaler.amax_history.tolist() == [0.0, 0.0]
    current = CurrentScaling(format="e4m3").make_scaler("input")
    assert current.compute_scale(torch.zeros(3)).item() == 1.0
    assert torch.equal(current.quantize_dequantize(torch.zeros(3)), torch.zeros(3))


def test_scaler_state_dict_round_trips():
    """A scaler restored from state_dict produces the same scales as the original from then on."""
    recipe = DelayedScaling(format="hif8", amax_history_len=5)
    original = recipe.make_scaler("weight")
    for a in (3.0, 1.0, 6.0):
        original.compute_scale(torch.tensor([a]))
    restored = recipe.make_scaler("weight")
    restored.load_state_dict(original.state_dict())
    assert torch.equal(restored.amax_history, original.amax_history)
    assert torch.equal(restored.scale, original.scale) and restored.num_updates == 3
    for a in (0.5, 9.0):
        assert torch.equal(original.compute_scale(torch.tensor([a])), restored.compute_scale(torch.tensor([a])))
    shorter = DelayedScaling(format="hif8", amax_history_len=2).make_scaler("weight")
    shorter.load_state_dict(original.state_dict())
    assert shorter.amax_history.tolist() == original.amax_history[:2].tolist()


def _amax_reduction_worker(rank, world_size):
    # run_on_ranks provides the rendezvous variables; env:// reads them.
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    scaler = HiF8Recipe().make_scaler("input")
    local = torch.tensor([1.0, 3.0]) if rank == 0 else torch.tensor([-5.0, 2.0])
    return scaler.compute_scale(local, group=dist.group.WORLD).item()


@pytest.mark.slow
def test_amax_is_all_reduced_so_ranks_agree_on_the_scale():
    """Two gloo ranks with different local amaxes both scale by the global amax (MAX all-reduce)."""
    scales = run_on_ranks(_amax_reduction_worker, 2)
    assert scales[0] == scales[1] == pytest.approx(15.0 / 5.0)


def test_quant_config_defaults_and_recipes():
    """QuantConfig defaults are off; each recipe name builds the documented recipe."""
    config = QuantConfig()
    assert not config.enabled and config.build_recipe() is None
    assert config.modules.include == ["blocks.*"] and "*norm*" in config.modules.exclude
    names = ("hif8", "hif8_delayed", "fp8_e4m3", "fp8_hybrid", "fp8_delayed")
    built = {name: QuantConfig(recipe=name).build_recipe() for name in names}
    assert built["hif8"] == HiF8Recipe()
    assert isinstance(built["hif8_delayed"], DelayedScaling) and built["hif8_delayed"].format == "hif8"
    assert built["fp8_e4m3"] == CurrentScaling(format="e4m3")
    assert built["fp8_hybrid"] == CurrentScaling(format="hybrid")
    assert built["fp8_delayed"] == DelayedScaling(format="hybrid", amax_history_len=1024)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(recipe="int8"), "quant.recipe"),
        (dict(recipe="hif8", margin=-1), "quant.margin"),
        (dict(recipe="hif8", amax_history_len=0), "quant.amax_history_len"),
        (dict(recipe="fp8_delayed", amax_compute_algo="mean"), "quant.amax_compute_algo"),
        (dict(recipe="fp8_hybrid", stochastic_grad_rounding=True), "quant.stochastic_grad_rounding"),
        (dict(recipe="hif8", stochastic_grad_rounding="yes"), "quant.stochastic_grad_rounding"),
        (dict(recipe="hif8", backend="scaled_mm"), "quant.backend"),
        (dict(recipe="hif8", backend="cuda"), "quant.backend"),
        (dict(recipe="hif8", modules=ModulesConfig(include="blocks.*")), "quant.modules.include"),
    ],
)
def test_quant_config_errors_name_the_key(overrides, key):
    """Invalid settings raise ConfigError naming the dotted key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        QuantConfig(**overrides).validate()


def test_recipe_errors_name_the_field():
    """Recipes built in code validate their fields too."""
    with pytest.raises(ConfigError, match="DelayedScaling.amax_compute_algo"):
        DelayedScaling(amax_compute_algo="avg")
    with pytest.raises(ConfigError, match="CurrentScaling.format"):
        CurrentScaling(format="int4")
    assert isinstance(HiF8Recipe().make_scaler("grad_output"), TensorScaler)
