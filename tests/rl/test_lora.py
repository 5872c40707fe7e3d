"""LoRA on the DiT's megatron linears: starts as the base model, is the low-rank projection of full
fine-tuning, merges exactly, and its reference policy is the same module with adapters off (no copy)."""

import pytest
import torch

from osp_megatron.engine.lora import adapters_disabled, apply_lora, lora_layers, merge_lora
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.testing import gathered_gradients

TARGETS = ["linear_q", "linear_k", "linear_v", "linear_proj"]


def _inputs():
    generator = torch.Generator().manual_seed(7)
    return (
        torch.randn(2, 16, 2, 4, 4, generator=generator),
        torch.tensor([300.0, 800.0]),
        torch.randn(2, 32, 32, generator=generator),
    )


def test_lora_starts_as_base_and_reference_is_the_base(tiny_model, make_tiny_model):
    """Zero-initialised B reproduces the base; after training the adapters, disabling them gives the base
    output again; only adapter weights are trainable and the base weights exist once."""
    model = make_tiny_model()
    inputs = _inputs()
    base = model(*inputs).detach()
    base_count = sum(p.numel() for p in model.parameters())
    adapted = apply_lora(model, rank=4, alpha=8.0, target_modules=TARGETS)
    assert len(adapted) == 2 * 2 * 4  # blocks x (self, cross) x (q, k, v, proj)
    torch.testing.assert_close(model(*inputs), base, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapter_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == base_count + adapter_count
    with torch.no_grad():
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    assert (model(*inputs) - base).abs().max() > 1e-4
    with adapters_disabled(model):
        torch.testing.assert_close(model(*inputs), base, rtol=0, atol=0)
    merged = model(*inputs).detach()
    merge_lora(model)
    assert not lora_layers(model)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in tiny_model.named_parameters())
    torch.testing.assert_close(model(*inputs), merged, rtol=1e-5, atol=1e-6)


def test_lora_gradient_is_full_fine_tuning_projected(make_tiny_model):
    """At B = 0, dL/dB = scaling x (dL/dW) A^T for every adapted linear, with dL/dW the full fine-tuning
    gradient of the same loss: LoRA follows full fine-tuning within the adapters' subspace."""
    full, lora = make_tiny_model(num_layers=1), make_tiny_model(num_layers=1)
    apply_lora(lora, rank=3, alpha=6.0, target_modules=TARGETS)
    inputs = _inputs()
    full(*inputs).square().mean().backward()
    lora(*inputs).square().mean().backward()
    layers = dict((name, module) for name, module in lora.named_modules() if module in set(lora_layers(lora)))
    assert layers
    for name, layer in layers.items():
        full_grad = full.get_submodule(name).weight.grad
        a = layer.lora_A["default"].weight
        expected = layer.scaling["default"] * full_grad @ a.T
        torch.testing.assert_close(layer.lora_B["default"].weight.grad, expected, rtol=1e-4, atol=1e-7)


def _lora_output_and_grads(rank, world_size):
    from osp_megatron.checkpointing.sharded import partition_dim
    from osp_megatron.config.loader import from_dict
    from osp_megatron.models.builder import build_model
    from osp_megatron.models.config import ModelConfig
    from osp_megatron.parallel.state import ParallelConfig, init_distributed, tensor_parallel_rank

    init_distributed(ParallelConfig(tensor=world_size))
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", "num_layers": 1}, "model"))
    apply_lora(model, rank=3, alpha=6.0, target_modules=TARGETS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight (B too) drawn at full size and sliced like its layer splits it
        for param in model.parameters():
            dim = partition_dim(param)
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= world_size
            full = torch.randn(shape, generator=generator) * 0.05
            param.copy_(full if dim is None else full.chunk(world_size, dim)[tensor_parallel_rank()])
    output = model(*_inputs())
    output.square().mean().backward()
    return output.detach(), gathered_gradients(model, world_size, include=lambda name: "lora_" in name)


@pytest.mark.slow
def test_lora_under_tensor_parallelism_equals_one_rank():
    """TP=2 LoRA (A or B split like its megatron layer, adapters initialised at full size and sliced) gives
    the TP=1 output and the same gathered adapter gradients."""
    ((out_1, grads_1),) = run_on_ranks(_lora_output_and_grads, 1)
    out_2, grads_2 = run_on_ranks(_lora_output_and_grads, 2)[0]
    torch.testing.assert_close(out_2, out_1, rtol=1e-4, atol=1e-6)
    assert grads_1.keys() == grads_2.keys() and grads_1
    for name in grads_1:
        scale = float(grads_1[name].abs().max().clamp(min=1e-8))
        torch.testing.assert_close(grads_2[name], grads_1[name], rtol=1e-4, atol=1e-5 * scale)
