"""Per-shape choice between attention kernels by measurement: the first call of a shape times each one briefly.

docs/skiparse.md ("cuDNN or flash-attn-4 on Hopper") describes the rule, its log line and its switch.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from osp_megatron.utils.timing import median_cuda_ms, outside_saved_tensor_hooks

logger = logging.getLogger(__name__)

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"

# "0" turns the probe off: every shape then keeps the default kernel (cuDNN on Hopper).
PROBE_ENABLED = os.environ.get("OSP_MEGATRON_ATTENTION_PROBE", "1") != "0"
# Below 1e11 forward FLOPs (about 0.2 ms of attention on an H100) a faster kernel saves microseconds per call,
# less than the probe's timing noise, while the probe itself allocates and runs both kernels several times (and
# flash-attn-4 compiles for seconds on first use): such shapes keep the default kernel unmeasured.
MIN_PROBE_FLOPS = 1e11
# Timed repetitions per kernel after one untimed warm-up call; the median counts.
PROBE_REPEATS = 3


class KernelKey(NamedTuple):
    """What a kernel choice is made for: the attention shape, its dtype and whether a backward follows."""

    batch: int
    q_tokens: int
    k_tokens: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    direction: str  # FORWARD or FORWARD_BACKWARD
    candidates: str = "16-bit"  # which kernels compete: the 16-bit ones, or "FP8 or 16-bit" (quant.attention)

    @property
    def forward_flops(self) -> int:
        """4 B H Lq Lk D: the two matrix products of the forward."""
        return 4 * self.batch * self.heads * self.q_tokens * self.k_tokens * self.head_dim

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"batch {self.batch}, {self.q_tokens} x {self.k_tokens} tokens, {self.heads} heads x {self.head_dim}, "
            f"{dtype}, {self.direction}" + ("" if self.candidates == "16-bit" else f", {self.candidates}")
        )


@dataclass(frozen=True)
class KernelDecision:
    """The kernel chosen for a key, the probe's median milliseconds per kernel and the errors of those that failed."""

    kernel: str
    times_ms: dict
    failures: dict


_decisions: dict[KernelKey, KernelDecision] = {}
_unreported: list[str] = []  # one line per decision, until a job takes them (new_decision_lines)


def kernel_decisions() -> dict[KernelKey, KernelDecision]:
    """Every decision this process has made so far (a copy), for benchmarks and logs."""
    return dict(_decisions)


def reset_kernel_decisions() -> None:
    """Forget every decision: the next call of each shape probes again."""
    _decisions.clear()
    _unreported.clear()


def new_decision_lines() -> list[str]:
    """One line per decision made since the last call, for the job's console (osp-train, osp-sample)."""
    lines = list(_unreported)
    _unreported.clear()
    return lines


def attention_direction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """FORWARD_BACKWARD when autograd records the call, FORWARD when no gradient can be taken."""
    records = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return FORWARD_BACKWARD if records else FORWARD


def worth_probing(key: KernelKey) -> bool:
    """Whether the probe is on and the problem large enough (MIN_PROBE_FLOPS) for the choice to matter."""
    return PROBE_ENABLED and key.forward_flops >= MIN_PROBE_FLOPS


def choose_kernel(key: KernelKey, device: torch.device, kernels: dict[str, Callable]) -> str:
    """The name of the fastest of `kernels` (name -> attention(q, k, v) -> out) for `key`, probed on its first call.

    The first kernel is the default: it wins ties and stands where no kernel ran in the probe.
    """
    decision = _decisions.get(key)
    if decision is None:
        decision = _decisions[key] = _probe(key, device, kernels)
        _log(key, decision)
    return decision.kernel


@torch.compiler.disable
def _probe(key: KernelKey, device: torch.device, kernels: dict[str, Callable]) -> KernelDecision:
    """Time every kernel on random tensors of the key's shape: one untimed call, then the median of PROBE_REPEATS."""
    # A generator of its own leaves the caller's random stream (noise, timesteps, dropout) as it was.
    generator = torch.Generator(device=device).manual_seed(0)

    def sample(tokens):
        shape = (key.batch, tokens, key.heads, key.head_dim)
        return torch.randn(shape, generator=generator, device=device, dtype=key.dtype)

    q, k, v = sample(key.q_tokens), sample(key.k_tokens), sample(key.k_tokens)
    grad_out = None
    if key.direction == FORWARD_BACKWARD:
        q, k, v = (tensor.requires_grad_() for tensor in (q, k, v))
        grad_out = sample(key.q_tokens)
    times, failures = {}, {}
    with outside_saved_tensor_hooks():
        for name, attend in kernels.items():

            def run(attend=attend):
                _attend_once(attend, q, k, v, grad_out)

            try:
                run()  # warm-up, untimed: flash-attn-4 compiles its kernels on first use, cuDNN builds its plan
                times[name] = _measure_ms(run)
            except Exception as error:  # the kernel cannot run this shape here; the others still compete
                failures[name] = f"{type(error).__name__}: {error}"
    # min keeps the first of equal times, and `times` is in the order of `kernels`: the default wins ties.
    kernel = min(times, key=times.get) if times else next(iter(kernels))
    return KernelDecision(kernel, times, failures)


def _attend_once(attend, q, k, v, grad_out):
    """The forward, or the forward and the backward of q, k and v when grad_out is given."""
    if grad_out is None:
        with torch.no_grad():
            attend(q, k, v)
        return
    with torch.enable_grad():
        torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)


def _measure_ms(run: Callable[[], None]) -> float:
    """Median milliseconds of run() over PROBE_REPEATS calls, timed with CUDA events on the current stream."""
    return median_cuda_ms(run, PROBE_REPEATS)


def _log(key: KernelKey, decision: KernelDecision) -> None:
    for name, error in decision.failures.items():
        logger.warning("attention kernel %s failed for %s (%s); left out for this shape", name, key.describe(), error)
    times = ", ".join(f"{name} {ms:.2f} ms" for name, ms in decision.times_ms.items()) or "no kernel ran"
    logger.info("attention kernel for %s: %s (probe: %s)", key.describe(), decision.kernel, times)
    _unreported.append(f"{key.describe()}: {decision.kernel} (probe: {times})")
