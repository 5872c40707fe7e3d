"""Tests of the measured kernel choice of backend "auto" on Hopper (cuDNN or flash-attn-4) and of the flash_attn_4
backend, on CPU: a stand-in flash-attn-4 module, a spy on the cuDNN path and fake probe timings replace the GPU.

dispatch._hopper_unmasked is the auto rule's branch for unmasked fp16/bf16 CUDA tensors on Hopper; called here
directly with CPU tensors, it runs the same choice.
"""

import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from osp_megatron.attention import dispatch, kernel_choice
from osp_megatron.attention.dispatch import (
    AttentionBackendUnavailableError,
    dot_product_attention,
    dot_product_attention_varlen,
)
from osp_megatron.attention.kernel_choice import FORWARD, FORWARD_BACKWARD, KernelKey

LOGGER = "osp_megatron.attention.kernel_choice"
SHAPE = (2, 24, 3, 16)  # batch, tokens, heads, head_dim: 4 * 2 * 3 * 24 * 24 * 16 = 221,184 forward FLOPs
SHIPPED_MIN_PROBE_FLOPS = kernel_choice.MIN_PROBE_FLOPS  # read before the fixture lowers it for the tests


def reference_attention(q, k, v):
    """float64 attention through the math backend, the CPU reference of these tests."""
    return dot_product_attention(q.double(), k.double(), v.double(), backend="math")


def flash_attn_func_computing(calls, error=None):
    """flash-attn-4's entry point: (out, lse) like the real one, counting its calls; raising `error` if given."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append("flash_attn_4")
        if error is not None:
            raise error
        out = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return out.to(q.dtype), None

    return flash_attn_func


class FakeKernels:
    """flash-attn-4 stand-in, a spy on the cuDNN path and probe timings: `times` maps kernel name to milliseconds."""

    def __init__(self, monkeypatch, times, flash_attn_4_error=None, cudnn_error=None):
        self.times, self.calls, self.timed, self.imports = dict(times), [], [], 0
        real_cudnn = dispatch._hopper_sdpa
        module = types.SimpleNamespace(flash_attn_func=flash_attn_func_computing(self.calls, flash_attn_4_error))

        def cudnn(q, k, v):
            self.calls.append("cudnn")
            if cudnn_error is not None:
                raise cudnn_error
            return real_cudnn(q, k, v)

        def import_flash_attn_4():
            self.imports += 1
            return module

        monkeypatch.setattr(dispatch, "_hopper_sdpa", cudnn)
        monkeypatch.setattr(dispatch, "_import_flash_attn_4", import_flash_attn_4)
        monkeypatch.setattr(kernel_choice, "_measure_ms", self.measure)

    def measure(self, run):
        """The fake CUDA-event timer: runs the probe's call once and reports the time set for its kernel."""
        first_call = len(self.calls)
        run()
        kernel = self.calls[first_call]
        self.timed.append(kernel)
        return self.times[kernel]

    def attend(self, requires_grad=False, shape=SHAPE, seed=0):
        """The auto rule on one set of bf16 inputs; returns (output, kernels called by that call alone)."""
        generator = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(shape, generator=generator).bfloat16().requires_grad_(requires_grad) for _ in range(3))
        first_call = len(self.calls)
        out = dispatch._hopper_unmasked(q, k, v)
        torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=2e-2, atol=2e-2)
        return out, self.calls[first_call:]


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Every test starts without decisions, with the probe on and a threshold below SHAPE's FLOPs."""
    kernel_choice.reset_kernel_decisions()
    monkeypatch.setattr(kernel_choice, "PROBE_ENABLED", True)
    monkeypatch.setattr(kernel_choice, "MIN_PROBE_FLOPS", 1e5)
    yield
    kernel_choice.reset_kernel_decisions()


def test_default_threshold_probes_wan_shapes_and_skips_tiny_ones():
    """The shipped MIN_PROBE_FLOPS lets wan-14b's Skiparse, full and text attention be measured, not a tiny model's."""
    for batch, q_tokens, k_tokens in ((4, 20160, 20160), (1, 80640, 80640), (1, 80640, 512)):
        key = KernelKey(batch, q_tokens, k_tokens, 40, 128, torch.bfloat16, FORWARD)
        assert key.forward_flops >= SHIPPED_MIN_PROBE_FLOPS
    assert KernelKey(2, 512, 512, 4, 16, torch.bfloat16, FORWARD).forward_flops < SHIPPED_MIN_PROBE_FLOPS


@pytest.mark.parametrize(
    "times, winner",
    [
        ({"cudnn": 2.0, "flash_attn_4": 1.0}, "flash_attn_4"),
        ({"cudnn": 1.0, "flash_attn_4": 2.0}, "cudnn"),
        ({"cudnn": 1.0, "flash_attn_4": 1.0}, "cudnn"),  # a tie keeps the default
    ],
)
def test_probe_picks_the_faster_kernel_once_per_key(monkeypatch, times, winner):
    """The first call of a shape times both kernels (one warm-up each, then the timer) and runs the faster;
    later calls of that shape reuse the decision without timing anything."""
    fake = FakeKernels(monkeypatch, times)
    _, first = fake.attend()
    # Each kernel's untimed warm-up and the fake timer's call, then the call itself.
    assert first == ["cudnn", "cudnn", "flash_attn_4", "flash_attn_4", winner]
    assert fake.timed == ["cudnn", "flash_attn_4"]
    (key,) = kernel_choice.kernel_decisions()
    assert key == KernelKey(2, 24, 24, 3, 16, torch.bfloat16, FORWARD)
    assert kernel_choice.kernel_decisions()[key].kernel == winner
    assert kernel_choice.kernel_decisions()[key].times_ms == times
    for seed in (1, 2):
        _, later = fake.attend(seed=seed)
        assert later == [winner]
    assert fake.timed == ["cudnn", "flash_attn_4"]


def test_each_direction_and_shape_has_its_own_decision(monkeypatch):
    """Forward-only calls and calls that autograd records are keyed apart, as are different shapes; each key is
    probed once and keeps its own winner."""
    fake = FakeKernels(monkeypatch, {"cudnn": 2.0, "flash_attn_4": 1.0})
    assert fake.attend()[1][-1] == "flash_attn_4"
    fake.times = {"cudnn": 1.0, "flash_attn_4": 2.0}
    out, called = fake.attend(requires_grad=True)
    assert called[-1] == "cudnn"
    out.float().sum().backward()  # the chosen kernel's output carries gradients
    with torch.no_grad():  # inputs that require grad, but no graph is recorded: a forward-only call
        assert fake.attend(requires_grad=True)[1] == ["flash_attn_4"]
    assert fake.attend(shape=(1, 24, 3, 16))[1][-1] == "cudnn"
    decisions = {key: decision.kernel for key, decision in kernel_choice.kernel_decisions().items()}
    assert decisions == {
        KernelKey(2, 24, 24, 3, 16, torch.bfloat16, FORWARD): "flash_attn_4",
        KernelKey(2, 24, 24, 3, 16, torch.bfloat16, FORWARD_BACKWARD): "cudnn",
        KernelKey(1, 24, 24, 3, 16, torch.bfloat16, FORWARD): "cudnn",
    }
    assert len(fake.timed) == 6


def test_forward_backward_probe_times_the_backward_too(monkeypatch):
    """For a key whose direction is forward+backward, each probed call runs the backward of q, k and v."""
    fake = FakeKernels(monkeypatch, {"cudnn": 2.0, "flash_attn_4": 1.0})
    gradient_inputs = []
    real_grad = torch.autograd.grad

    def spy_grad(outputs, inputs, *args, **kwargs):
        gradient_inputs.append(len(inputs))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy_grad)
    fake.attend(requires_grad=True)
    assert gradient_inputs == [3, 3, 3, 3]  # the warm-up and the timed call of each kernel
    kernel_choice.reset_kernel_decisions()
    gradient_inputs.clear()
    fake.attend()
    assert gradient_inputs == []


def test_probe_logs_one_info_line_with_both_times(monkeypatch, caplog):
    """The decision is logged once, at INFO, naming the shape, the choice and both kernels' times."""
    fake = FakeKernels(monkeypatch, {"cudnn": 12.5, "flash_attn_4": 10.25})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fake.attend()
        fake.attend(seed=1)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "attention kernel for batch 2, 24 x 24 tokens, 3 heads x 16, bfloat16, forward: flash_attn_4 "
        "(probe: cudnn 12.50 ms, flash_attn_4 10.25 ms)"
    )


def test_small_problems_keep_cudnn_without_a_probe(monkeypatch, caplog):
    """Below MIN_PROBE_FLOPS nothing is timed, logged or recorded and flash-attn-4 is not even imported."""
    monkeypatch.setattr(kernel_choice, "MIN_PROBE_FLOPS", 221_185)  # one above SHAPE's forward FLOPs
    fake = FakeKernels(monkeypatch, {"cudnn": 2.0, "flash_attn_4": 1.0})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert fake.attend()[1] == ["cudnn"]
    assert fake.timed == [] and fake.imports == 0 and not caplog.records
    assert kernel_choice.kernel_decisions() == {}
    monkeypatch.setattr(kernel_choice, "MIN_PROBE_FLOPS", 221_184)  # exactly SHAPE's: probed
    assert fake.attend()[1][-1] == "flash_attn_4"


@pytest.mark.parametrize("failing", ["flash_attn_4", "cudnn"])
def test_a_kernel_failing_in_the_probe_is_left_out_for_that_key(monkeypatch, caplog, failing):
    """A kernel that raises in the probe is recorded with its error and logged once as a warning; the other
    kernel is used for that key (cuDNN, the default, when flash-attn-4 failed) and the failed one never runs
    again for it."""
    error = RuntimeError("no kernel for this shape")
    errors = {f"{failing}_error": error}
    fake = FakeKernels(monkeypatch, {"cudnn": 1.0, "flash_attn_4": 2.0}, **errors)
    other = "cudnn" if failing == "flash_attn_4" else "flash_attn_4"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fake.attend()
        assert fake.attend(seed=1)[1] == [other]
    decision = kernel_choice.kernel_decisions()[KernelKey(2, 24, 24, 3, 16, torch.bfloat16, FORWARD)]
    assert decision.kernel == other and decision.failures == {failing: "RuntimeError: no kernel for this shape"}
    assert list(decision.times_ms) == [other]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and failing in warnings[0].getMessage() and "no kernel" in warnings[0].getMessage()
    assert fake.calls.count(failing) == 1  # the warm-up that raised, nothing after


def test_probe_off_keeps_cudnn_everywhere(monkeypatch):
    """With the probe off, auto runs cuDNN without timing or importing flash-attn-4 (the behaviour before it)."""
    monkeypatch.setattr(kernel_choice, "PROBE_ENABLED", False)
    fake = FakeKernels(monkeypatch, {"cudnn": 2.0, "flash_attn_4": 1.0})
    assert fake.attend()[1] == ["cudnn"] and fake.attend(requires_grad=True)[1] == ["cudnn"]
    assert fake.timed == [] and fake.imports == 0 and kernel_choice.kernel_decisions() == {}


def probe_enabled_in_a_fresh_interpreter(setting):
    """kernel_choice.PROBE_ENABLED as a new process sees it with OSP_MEGATRON_ATTENTION_PROBE=setting."""
    result = subprocess.run(
        [sys.executable, "-c", "from osp_megatron.attention import kernel_choice; print(kernel_choice.PROBE_ENABLED)"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OSP_MEGATRON_ATTENTION_PROBE": setting},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip() == "True"


def test_environment_variable_turns_the_probe_off():
    """OSP_MEGATRON_ATTENTION_PROBE=0 turns the probe off; 1 leaves it on."""
    assert not probe_enabled_in_a_fresh_interpreter("0")
    assert probe_enabled_in_a_fresh_interpreter("1")


def test_unsupported_head_dim_or_other_value_head_dim_keeps_cudnn(monkeypatch):
    """A head_dim flash-attn-4 refuses (not a multiple of 8) or a v head_dim unlike q's goes to cuDNN unprobed."""
    fake = FakeKernels(monkeypatch, {"cudnn": 2.0, "flash_attn_4": 1.0})
    assert fake.attend(shape=(2, 24, 3, 12))[1] == ["cudnn"]
    q = torch.randn(2, 24, 3, 16).bfloat16()
    dispatch._hopper_unmasked(q, q, torch.randn(2, 24, 3, 8).bfloat16())
    assert fake.calls[-1] == "cudnn" and fake.timed == []


def test_decision_survives_the_caller_activation_checkpointing(monkeypatch):
    """A probe inside a non-reentrant checkpoint keeps its own graph apart from the checkpoint's saved-tensor
    hooks; the checkpoint's recomputation reuses the decision, so forward and recomputation match."""
    fake = FakeKernels(monkeypatch, {"cudnn": 2.0, "flash_attn_4": 1.0})
    q, k, v = (torch.randn(SHAPE).bfloat16().requires_grad_() for _ in range(3))
    out = torch.utils.checkpoint.checkpoint(dispatch._hopper_unmasked, q, k, v, use_reentrant=False)
    out.float().sum().backward()
    assert fake.calls[-2:] == ["flash_attn_4", "flash_attn_4"]  # forward, then its recomputation
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("winner", ["cudnn", "flash_attn_4"])
def test_compiled_caller_uses_the_decision_without_tracing_the_probe(monkeypatch, winner):
    """Under torch.compile the choice is made once while tracing and kept as a constant: no graph break when
    cuDNN wins, one (flash-attn-4 runs eagerly) when it does not; results and gradients equal eager ones."""
    times = {"cudnn": 1.0, "flash_attn_4": 2.0} if winner == "cudnn" else {"cudnn": 2.0, "flash_attn_4": 1.0}
    fake = FakeKernels(monkeypatch, times)
    weight = torch.randn(48, 48, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(2, 24, 48, dtype=torch.bfloat16)

    def block(x, weight):
        q = (x @ weight).view(*SHAPE)
        return (dispatch._hopper_unmasked(q, q, q).flatten(2) * 2).sin()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x, weight)
    assert explanation.graph_break_count == (0 if winner == "cudnn" else 1)
    torch._dynamo.reset()
    kernel_choice.reset_kernel_decisions()
    fake.timed.clear()
    compiled = torch.compile(block, backend="aot_eager")
    out = compiled(x, weight)
    (grad,) = torch.autograd.grad(out.float().sum(), weight)
    assert len(fake.timed) == 2  # one probe, run while tracing
    expected = block(x, weight)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.float().sum(), weight)[0], rtol=2e-2, atol=2e-2)
    assert fake.calls[-1] == winner and len(fake.timed) == 2
    torch._dynamo.reset()


def test_flash_attn_4_backend_errors(monkeypatch):
    """backend='flash_attn_4': missing package names the fa4 extra; other dtypes, head sizes and a key mask are
    refused with ValueError; with the package it returns flash-attn-4's output tensor, not its (out, lse) pair."""
    q = torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(dispatch, "_import_flash_attn_4", lambda: None)
    with pytest.raises(AttentionBackendUnavailableError, match=r"pip install 'osp-megatron\[fa4\]'"):
        dot_product_attention(q, q, q, backend="flash_attn_4")
    calls = []
    module = types.SimpleNamespace(flash_attn_func=flash_attn_func_computing(calls))
    monkeypatch.setattr(dispatch, "_import_flash_attn_4", lambda: module)
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        dot_product_attention(q.float(), q.float(), q.float(), backend="flash_attn_4")
    for head_dim in (12, 264):
        bad = torch.zeros(1, 4, 2, head_dim, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="multiple of 8 from 8 to 256"):
            dot_product_attention(bad, bad, bad, backend="flash_attn_4")
    with pytest.raises(ValueError, match="key_padding_mask"):
        dot_product_attention(q, q, q, key_padding_mask=torch.ones(1, 4, dtype=torch.bool), backend="flash_attn_4")
    assert calls == []
    q, k, v = (torch.randn(2, 5, 2, 16).bfloat16() for _ in range(3))
    out = dot_product_attention(q, k, v, backend="flash_attn_4")
    assert calls == ["flash_attn_4"] and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=2e-2, atol=2e-2)


@pytest.fixture
def only_flash_attn_4_installed(tmp_path, monkeypatch):
    """A `flash_attn` folder as flash-attn-4's wheel installs it: flash_attn/cute/ and no flash_attn/__init__.py."""
    package = tmp_path / "flash_attn" / "cute"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import torch.nn.functional as F\n\n"
        "def flash_attn_func(q, k, v, softmax_scale=None, causal=False):\n"
        "    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)\n"
        "    return out, None\n"
    )
    for name in [name for name in sys.modules if name == "flash_attn" or name.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    dispatch._import_flash_attn.cache_clear()
    dispatch._import_flash_attn_4.cache_clear()
    yield
    for name in [name for name in sys.modules if name == "flash_attn" or name.startswith("flash_attn.")]:
        del sys.modules[name]
    dispatch._import_flash_attn.cache_clear()
    dispatch._import_flash_attn_4.cache_clear()


def test_flash_attn_4_namespace_package_is_not_flash_attn_2(only_flash_attn_4_installed):
    """With only flash-attn-4 installed, `import flash_attn` succeeds as a namespace package without flash-attn 2's
    functions: the flash-attn 2 paths count it as absent (so auto off Hopper and varlen do not call into it) and
    say what to install, while backend 'flash_attn_4' finds flash_attn.cute."""
    import flash_attn

    assert not hasattr(flash_attn, "flash_attn_func")  # the situation this test is about
    assert dispatch._import_flash_attn() is None
    assert dispatch._import_flash_attn_4() is not None
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(AttentionBackendUnavailableError, match=r"osp-megatron\[gpu\]"):
        dot_product_attention(q, q, q, backend="flash_attn")
    with pytest.raises(AttentionBackendUnavailableError, match=r"osp-megatron\[gpu\]"):
        dot_product_attention_varlen(
            q[0], q[0], q[0], torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4, backend="flash_attn"
        )
    out = dot_product_attention(q, q, q, backend="flash_attn_4")
    torch.testing.assert_close(out.double(), reference_attention(q, q, q), rtol=2e-2, atol=2e-2)


def _cuda_with_flash_attn_4():
    return torch.cuda.is_available() and dispatch._import_flash_attn_4() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_with_flash_attn_4(), reason="needs a CUDA device and flash-attn-4")
def test_flash_attn_4_backend_on_gpu_matches_float64_reference():
    """flash-attn-4 (bf16, unequal query and key counts) matches float64 attention and its gradients."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator) for shape in ((2, 300, 4, 64), (2, 257, 4, 64), (2, 257, 4, 64)))
    leaves = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = dot_product_attention(*leaves, backend="flash_attn_4")
    expected = reference_attention(*(t.requires_grad_() for t in (q, k, v)))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=2e-2, atol=2e-2)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, leaves, grad_out.to("cuda", torch.bfloat16))
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not _cuda_with_flash_attn_4() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs a Hopper-or-newer GPU and flash-attn-4",
)
def test_auto_probe_on_hopper_times_both_kernels(monkeypatch):
    """On Hopper a shape over the threshold is probed with real CUDA-event timings of both kernels, and auto's
    output equals cuDNN's whichever wins."""
    monkeypatch.setattr(kernel_choice, "MIN_PROBE_FLOPS", SHIPPED_MIN_PROBE_FLOPS)
    q, k, v = (torch.randn(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        out = dot_product_attention(q, k, v)
        expected = dot_product_attention(q, k, v, backend="cudnn")
    (decision,) = kernel_choice.kernel_decisions().values()
    assert set(decision.times_ms) == {"cudnn", "flash_attn_4"} and min(decision.times_ms.values()) > 0
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_a_job_naming_an_unavailable_backend_ends_with_one_line(tmp_path, capsys):
    """osp-train with model.attention_backend=flash_attn_4 where it cannot run: exit status 2 and the message naming
    the extra, not a traceback."""
    from osp_megatron.training.cli import main

    status = main(
        [
            "--config",
            str(Path(__file__).parents[2] / "examples" / "tiny_t2v.yaml"),
            f"run.dir={tmp_path}/run",
            f"data.path={tmp_path}/data",
            f"data.eval_path={tmp_path}/eval",
            "model.attention_backend=flash_attn_4",
            "train.steps=1",
            "train.sample_at_end=false",
            "train.progress=false",
        ]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "osp-train: error: attention backend 'flash_attn_4' needs the flash-attn-4 package" in error
    assert "pip install 'osp-megatron[fa4]'" in error
    assert "Traceback" not in error
