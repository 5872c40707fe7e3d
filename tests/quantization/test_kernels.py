"""The compiled quantization kernels: one compiled version per specialisation, each within torch._dynamo's
recompilation limit, run outside autocast and on plain tensors. The compilation is allowed on the CPU here
(COMPILE_DEVICES) so that the dispatch the GPUs take runs in these tests."""

import warnings

import pytest
import torch
import torch.nn as nn

from osp_megatron.quantization import ModulesConfig, QuantConfig, TensorScaler, apply_quantization, kernels, recipes
from osp_megatron.quantization import linear as linear_module

ALL_LINEARS = ModulesConfig(include=["*"], exclude=[])


def _compiled_versions(fused_function) -> dict:
    """The dispatch's {specialisation key: compiled function} of a fused_on_cuda function."""
    (versions,) = [cell.cell_contents for cell in fused_function.__closure__ if isinstance(cell.cell_contents, dict)]
    return versions


def test_specialization_key_holds_dtypes_flags_and_floats_not_sizes():
    a, b = torch.zeros(3, 4), torch.zeros(5, 6)
    key = kernels._specialization_key
    assert key((a, 1.5, torch.float8_e4m3fn, True, 7)) == key((b, 1.5, torch.float8_e4m3fn, True, 9))
    assert key((a, True)) != key((a, False))
    assert key((a,)) != key((a.to(torch.bfloat16),))
    assert key((a, 448.0)) != key((a, 57344.0))


def test_dispatch_runs_without_autocast_and_on_plain_tensors(monkeypatch):
    """Under autocast and with a parameter as input (no gradient recorded), the compiled version sees autocast off
    and a plain tensor; each key gets a function with its own code object."""
    seen = []

    @kernels.fused_on_cuda
    def probe(tensor, flag: bool):
        seen.append((torch.is_autocast_enabled("cpu"), type(tensor), flag))
        return tensor * 2

    monkeypatch.setattr(kernels, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "compile", lambda function, dynamic: function)  # the dispatch, not inductor
    weight = nn.Parameter(torch.ones(2, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probe(weight, True)
        probe(torch.ones(3), False)
    assert seen == [(False, torch.Tensor, True), (False, torch.Tensor, False)]
    versions = _compiled_versions(probe)
    assert len(versions) == 2
    assert len({function.__code__ for function in versions.values()}) == 2


@pytest.mark.slow  # compiles about ten graphs with the CPU backend (~10 s)
def test_fp8_training_and_inference_stay_within_the_recompile_limit(monkeypatch):
    """A bf16-autocast training step of linears of several shapes (fp32 weights, 37 and 48 tokens, a layer whose
    input needs no gradient) and an inference call: every compiled version of the fused FP8 encode holds at most
    two graphs (token count aligned or not), no recompilation limit is hit, and the results are the eager ones."""
    monkeypatch.setattr(linear_module, "scaled_mm_applies", lambda fmt, x2d, weight: fmt in ("e4m3", "hybrid"))
    monkeypatch.setattr(TensorScaler, "_fusable", lambda self, tensor, group: tensor.numel() > 0)

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 32))
        cross = nn.Linear(64, 64)
        for module in (model, cross):
            apply_quantization(module, QuantConfig(recipe="fp8_hybrid", select="all", modules=ALL_LINEARS))
        grads = []
        for tokens in (37, 48, 37, 100):
            x = torch.randn(tokens, 64)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().sum() + cross(torch.randn(32, 64)).float().sum()
            loss.backward()
            grads.append([p.grad.clone() for p in (*model.parameters(), *cross.parameters())])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(37, 64))
        return grads, out

    eager = run()
    monkeypatch.setattr(kernels, "COMPILE_DEVICES", ("cuda", "cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = run()
    problems = [str(w.message) for w in caught if "recompile" in str(w.message).lower() or "failed" in str(w.message)]
    assert not problems
    versions = _compiled_versions(recipes._fp8_current_scaling_encode)
    assert len(versions) >= 4  # weights (fp32) and activations (bf16), e4m3 and e5m2, with and without transpose
    for compiled_function in versions.values():
        code = compiled_function._torchdynamo_orig_callable.__code__
        assert len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)) <= 2
    for step_eager, step_compiled in zip(eager[0], compiled[0]):
        for a, b in zip(step_eager, step_compiled):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
