"""Quantized linears: module selection, exact-STE forward/backward, autocast, removal, checkpoints, training."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from osp_megatron.quantization import (
    CurrentScaling,
    ModulesConfig,
    QuantConfig,
    apply_quantization,
    hif8_round,
    load_quantization_state_dict,
    quantization_state_dict,
    quantized_autocast,
    quantized_modules,
    remove_quantization,
)


def _qdq_reference(tensor, target, round_fn):
    scale = target / tensor.abs().max().float()
    return (round_fn(tensor.float() * scale) * scale.reciprocal()).to(tensor.dtype)


def _hif8(t):
    return hif8_round(t, saturate=True)


def _e4m3(t):
    return t.clamp(-448, 448).to(torch.float8_e4m3fn).float()


def _e5m2(t):
    return t.clamp(-57344, 57344).to(torch.float8_e5m2).float()


class TinyDiT(nn.Module):
    """Names like the real model: embeddings, blocks with norms and linears, an output head."""

    def __init__(self, width=16):
        super().__init__()
        self.patch_embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm": nn.LayerNorm(width), "fc1": nn.Linear(width, 2 * width), "fc2": nn.Linear(2 * width, width)}
            )
            for _ in range(2)
        )
        self.blocks[0]["adaln_norm_proj"] = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = self.patch_embed(x)
        for block in self.blocks:
            h = h + block["fc2"](torch.nn.functional.gelu(block["fc1"](block["norm"](h))))
        return self.head(h)


def _linear_reference(layer, x, upstream, target_x, target_g, round_x, round_g):
    """Manual exact-STE reference: y = qdq(x) qdq(W)^T + b; grads from qdq(dy)."""
    x_q = _qdq_reference(x, target_x, round_x)
    w_q = _qdq_reference(layer.weight.detach(), target_x, round_x)
    y = x_q @ w_q.t() + layer.bias.detach()
    g_q = _qdq_reference(upstream, target_g, round_g)
    grad_x = g_q @ w_q
    grad_w = g_q.reshape(-1, g_q.shape[-1]).t() @ x_q.reshape(-1, x_q.shape[-1])
    grad_b = upstream.reshape(-1, upstream.shape[-1]).sum(0)
    return y, grad_x, grad_w, grad_b


def test_default_patterns_select_block_linears_only():
    """Defaults quantize linears under blocks.* and skip embeddings, norms and the head."""
    model = TinyDiT()
    names = apply_quantization(model, QuantConfig(recipe="hif8"))
    assert names == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert set(quantized_modules(model)) == set(names)


def test_custom_patterns_and_recipe_none():
    """include/exclude patterns are honoured; recipe none leaves the model untouched."""
    model = TinyDiT()
    config = QuantConfig(recipe="hif8", modules=ModulesConfig(include=["*"], exclude=["*fc2", "head"]))
    expected = ["patch_embed", "blocks.0.fc1", "blocks.0.adaln_norm_proj", "blocks.1.fc1"]
    assert apply_quantization(model, config) == expected
    assert apply_quantization(TinyDiT(), QuantConfig()) == []


@pytest.mark.parametrize(
    "recipe, target_x, target_g, round_x, round_g",
    [
        ("hif8", 15.0, 224.0, _hif8, _hif8),
        ("fp8_hybrid", 448.0, 57344.0, _e4m3, _e5m2),
        ("fp8_e4m3", 448.0, 448.0, _e4m3, _e4m3),
    ],
)
def test_torch_linear_forward_and_gradients_match_manual_ste(recipe, target_x, target_g, round_x, round_g):
    """nn.Linear output equals qdq(x) qdq(W)^T + b; dx, dW use qdq(dy) (straight-through), db uses dy."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 12)
    reference_layer = copy.deepcopy(layer)
    apply_quantization(layer, QuantConfig(recipe=recipe, modules=ModulesConfig(include=["*"], exclude=[])))
    x = torch.randn(3, 5, 24, requires_grad=True)
    upstream = torch.randn(3, 5, 12) * 1e-3
    y = layer(x)
    y.backward(upstream)
    ref_y, ref_dx, ref_dw, ref_db = _linear_reference(
        reference_layer, x.detach(), upstream, target_x, target_g, round_x, round_g
    )
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(layer.weight.grad, ref_dw, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(layer.bias.grad, ref_db, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(y, reference_layer(x))  # quantization really happened


def test_autocast_disables_and_overrides_and_removal_restores():
    """autocast(enabled=False) and remove_quantization give the exact fp32 output; a recipe overrides."""
    torch.manual_seed(1)
    model = TinyDiT()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8)
    apply_quantization(model, QuantConfig(recipe="hif8"))
    quantized = model(x)
    assert not torch.equal(quantized, reference(x))
    with quantized_autocast(enabled=False):
        assert torch.equal(model(x), reference(x))
    with quantized_autocast(recipe=CurrentScaling(format="e4m3")):
        fc1 = model.blocks[0]["fc1"]
        h = torch.randn(4, 16)
        expected = _qdq_reference(h, 448.0, _e4m3) @ _qdq_reference(fc1.weight.detach(), 448.0, _e4m3).t() + fc1.bias
        torch.testing.assert_close(fc1(h), expected, rtol=1e-6, atol=1e-6)
    remove_quantization(model)
    assert quantized_modules(model) == {} and "forward" not in model.blocks[0]["fc1"].__dict__
    assert torch.equal(model(x), reference(x))


def test_backward_outside_autocast_keeps_the_forward_choice():
    """The gradient is quantized even when backward runs after the autocast block has exited."""
    torch.manual_seed(2)
    layer = nn.Linear(16, 16)
    apply_quantization(layer, QuantConfig(recipe="hif8", modules=ModulesConfig(include=["*"], exclude=[])))
    x = torch.randn(4, 16, requires_grad=True)
    with quantized_autocast():
        y = layer(x)
    upstream = torch.randn(4, 16)
    y.backward(upstream)
    w_q = _qdq_reference(layer.weight.detach(), 15.0, _hif8)
    torch.testing.assert_close(x.grad, _qdq_reference(upstream, 224.0, _hif8) @ w_q, rtol=1e-6, atol=1e-7)


def test_frozen_weight_gets_no_gradient():
    """A frozen weight (LoRA base) stays without gradient while the input still gets one."""
    layer = nn.Linear(8, 8)
    layer.weight.requires_grad_(False)
    apply_quantization(layer, QuantConfig(recipe="hif8", modules=ModulesConfig(include=["*"], exclude=[])))
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None


def test_model_quantization_state_round_trips():
    """quantization_state_dict / load_quantization_state_dict restore histories and scales exactly."""
    torch.manual_seed(3)
    config = QuantConfig(recipe="hif8_delayed", amax_history_len=4)
    model = TinyDiT()
    apply_quantization(model, config)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
    saved = quantization_state_dict(model)
    assert set(saved["blocks.0.fc1"]) == {"input", "weight", "grad_output"}
    clone = copy.deepcopy(model)
    remove_quantization(clone)
    apply_quantization(clone, config)
    load_quantization_state_dict(clone, saved)
    for name, state in quantized_modules(clone).items():
        for role, scaler in state.scalers.items():
            assert torch.equal(scaler.amax_history, saved[name][role]["amax_history"])
            assert torch.equal(scaler.scale, saved[name][role]["scale"])
    x = torch.randn(4, 8)
    assert torch.equal(model(x), clone(x))


def _train(quant_config, steps=200, seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    inputs = torch.randn(256, 8)
    with torch.no_grad():
        targets = teacher(inputs) + 0.1 * torch.randn(256, 4)
    torch.manual_seed(seed + 1)
    model = TinyDiT()
    if quant_config is not None:
        apply_quantization(model, quant_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.fixture(scope="module")
def fp32_final_loss():
    """Final loss of the unquantized run, shared by the HiF8 training tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _train(None)
    torch.set_num_threads(previous)


@pytest.mark.parametrize("stochastic", [False, True])
def test_hif8_training_tracks_fp32(stochastic, fp32_final_loss):
    """A tiny MLP trained 200 steps with HiF8 ends within 5% of the fp32 loss."""
    reference = fp32_final_loss
    quantized = _train(QuantConfig(recipe="hif8", stochastic_grad_rounding=stochastic))
    assert abs(quantized - reference) / reference < 0.05, (quantized, reference)


# --- megatron-core tensor-parallel layers (TP = 1, single gloo rank) ---


@pytest.fixture(scope="module")
def megatron_tp1():
    """A single-rank gloo process group with megatron model parallelism initialised at TP=1."""
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    created = not dist.is_initialized()
    if created:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    initialized_here = not parallel_state.model_parallel_is_initialized()
    if initialized_here:
        parallel_state.initialize_model_parallel(1)
    yield parallel_state
    if initialized_here:
        parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _megatron_layers(parallel_state):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    init = lambda weight: nn.init.normal_(weight, std=0.2)  # noqa: E731
    model = nn.Module()
    model.blocks = nn.Module()
    model.blocks.fc1 = ColumnParallelLinear(16, 32, config=config, init_method=init, bias=True, gather_output=False)
    model.blocks.fc2 = RowParallelLinear(
        32, 16, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
    )
    with torch.no_grad():
        model.blocks.fc1.bias.normal_()
        model.blocks.fc2.bias.normal_()
    return model


def test_megatron_parallel_linears_match_manual_ste(megatron_tp1):
    """Column/RowParallelLinear (TP=1) quantized outputs and gradients equal the manual STE reference."""
    torch.manual_seed(4)
    model = _megatron_layers(megatron_tp1)
    names = apply_quantization(model, QuantConfig(recipe="hif8"))
    assert names == ["blocks.fc1", "blocks.fc2"]
    assert "_forward_impl" in model.blocks.fc1.__dict__
    for layer, width in ((model.blocks.fc1, 16), (model.blocks.fc2, 32)):
        x = torch.randn(6, 2, width, requires_grad=True)  # [sequence, batch, hidden]
        out, out_bias = layer(x)
        assert out_bias is None
        upstream = torch.randn_like(out)
        out.backward(upstream)
        ref_y, ref_dx, ref_dw, ref_db = _linear_reference(layer, x.detach(), upstream, 15.0, 224.0, _hif8, _hif8)
        torch.testing.assert_close(out, ref_y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, ref_dx, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.weight.grad, ref_dw, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, ref_db, rtol=1e-6, atol=1e-6)


def test_megatron_disabled_and_removed_paths_are_megatrons_own(megatron_tp1):
    """With autocast disabled, or after removal, the megatron layers give their unquantized output."""
    torch.manual_seed(5)
    model = _megatron_layers(megatron_tp1)
    x = torch.randn(4, 2, 16)
    expected = model.blocks.fc1(x)[0]
    apply_quantization(model, QuantConfig(recipe="fp8_hybrid"))
    assert not torch.equal(model.blocks.fc1(x)[0], expected)
    with quantized_autocast(enabled=False):
        assert torch.equal(model.blocks.fc1(x)[0], expected)
    assert remove_quantization(model) == ["blocks.fc1", "blocks.fc2"]
    assert "_forward_impl" not in model.blocks.fc1.__dict__
    assert torch.equal(model.blocks.fc1(x)[0], expected)
