"""FP8 fused attention on Hopper GPUs through cuDNN's graph API (the ``nvidia-cudnn-frontend`` package).

Forward: q, k and v are cast to E4M3 with per-tensor current scaling (scale = 448 / amax); the softmax
probabilities P enter the P.V product in E4M3 with the fixed scale 448 (P <= 1 by construction); the
output O is written in E4M3 with the scale 448 / amax(V), safe because O is a convex combination of rows
of V, and handed on dequantized. Backward: the output gradient is cast to E5M2 with its own amax;
dP = dO V^T is scaled from its bound head_dim * amax(dO) * amax(V); cuDNN writes dQ, dK, dV in E5M2 (on
Hopper it has no 16-bit outputs for FP8 attention), scaled from the amax history of earlier calls kept in
an FP8AttentionState; a call whose amaxes exceed those scales runs again with scales from its own amaxes.

E5M2 is the only gradient format: with E4M3 dO and dP, dQ and dK came out wrong (relative error ~1.0 on an
H200). What is saved for backward is 8-bit (q, k, v, o): half the memory of the 16-bit kernel. Shapes cuDNN
cannot run in FP8 fall back to the 16-bit kernel, reported once per shape. Layout: [batch, tokens, heads,
head_dim].
"""

import math
import threading
import warnings
from dataclasses import dataclass

import torch

from osp_megatron.attention.dispatch import AttentionBackendUnavailableError, dot_product_attention
from osp_megatron.quantization.formats import E4M3, E5M2
from osp_megatron.quantization.kernels import fused_on_cuda

# Backward format of the output gradient, dP and dQ/dK/dV, by the FP8 recipes' "format" name.
GRADIENT_FORMATS = {"hybrid": E5M2}
# P = exp(S - rowmax) lies in [0, 1]; its scale maps 1 to the E4M3 maximum.
PROBABILITY_SCALE = E4M3.max_value
_TINY_AMAX = 1e-30


def load_cudnn_frontend():
    """The ``cudnn`` module of nvidia-cudnn-frontend, or an error saying how to install it."""
    try:
        import cudnn
    except ImportError as error:
        raise AttentionBackendUnavailableError(
            "FP8 attention needs cuDNN's Python frontend: pip install 'osp-megatron[gpu]' "
            "(or pip install nvidia-cudnn-frontend)"
        ) from error
    return cudnn


def fp8_attention_supported(q: torch.Tensor) -> bool:
    """Whether FP8 attention can run for tensors like ``q`` here (CUDA, SM90+, 16-bit, frontend installed)."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(q.device) < (9, 0):
        return False
    try:
        load_cudnn_frontend()
    except AttentionBackendUnavailableError:
        return False
    return True


@fused_on_cuda
def _amax3(q, k, v):
    return torch.stack([t.abs().amax().float() for t in (q, k, v)])


@fused_on_cuda
def _scaled_cast(tensor, scale, max_value: float, fp8_dtype: torch.dtype):
    return (tensor.float() * scale).clamp(-max_value, max_value).to(fp8_dtype)


@fused_on_cuda
def _dequantize(tensor, descale, dtype: torch.dtype):
    return (tensor.float() * descale).to(dtype)


@fused_on_cuda
def _dequantize3(first, second, third, scales, dtype: torch.dtype):
    """(t / scale) for three FP8 tensors with their scales [3], in ``dtype``."""
    descales = scales.reciprocal()
    return tuple((t.float() * descales[i]).to(dtype) for i, t in enumerate((first, second, third)))


def _amax(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor, ord=math.inf).float()  # one pass, no |tensor| materialised


def quantization_scales(amax: torch.Tensor, max_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale) = (max_value / amax, amax / max_value), float32 with the shape of ``amax``.

    An all-zero tensor (amax 0) gets a finite scale; its codes are all zero either way.
    """
    amax = amax.float().clamp_min(_TINY_AMAX)
    return max_value / amax, amax / max_value


def gradient_product_descale(
    amax_grad_out: torch.Tensor, amax_v: torch.Tensor, head_dim: int, max_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale) of dP = dO V^T from its bound |dP| <= head_dim * amax(dO) * amax(V)."""
    return quantization_scales(amax_grad_out.float() * amax_v.float() * head_dim, max_value)


def _scalar(value: torch.Tensor) -> torch.Tensor:
    return value.float().reshape(1, 1, 1, 1).contiguous()


def cudnn_bhsd(t: torch.Tensor) -> tuple[list, list]:
    """cuDNN dims [B, H, S, D] and strides of a [B, S, H, D] tensor (no copy: cuDNN reads the strides)."""
    b, s, h, d = t.shape
    return [b, h, s, d], [t.stride(0), t.stride(2), t.stride(1), t.stride(3)]


@dataclass
class _Plan:
    graph: object
    tensors: dict[str, object]
    workspace_bytes: int


class CudnnFP8Attention:
    """Builds, caches and runs cuDNN's FP8 SDPA forward and backward graphs for one device.

    Graphs are keyed by shape, strides, dtypes and output types; a shape cuDNN refuses is remembered
    as unsupported so the caller falls back without retrying.
    """

    def __init__(self, device: torch.device):
        self.cudnn = load_cudnn_frontend()
        self.device = device
        with torch.cuda.device(device):
            self.handle = self.cudnn.create_handle()
        self.plans: dict[tuple, _Plan | None] = {}
        self.failures: dict[tuple, str] = {}

    def _bind_stream(self) -> None:
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream(self.device).cuda_stream)

    def _dtype(self, torch_dtype: torch.dtype):
        types = self.cudnn.data_type
        return {
            torch.float8_e4m3fn: types.FP8_E4M3,
            torch.float8_e5m2: types.FP8_E5M2,
            torch.bfloat16: types.BFLOAT16,
            torch.float16: types.HALF,
            torch.float32: types.FLOAT,
        }[torch_dtype]

    def _new_graph(self):
        types = self.cudnn.data_type
        return self.cudnn.pygraph(
            io_data_type=types.FP8_E4M3,
            intermediate_data_type=types.FLOAT,
            compute_data_type=types.FLOAT,
            handle=self.handle,
        )

    def _finish(self, graph) -> None:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([self.cudnn.heur_mode.A, self.cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()

    def _plan(self, key: tuple, build) -> _Plan | None:
        if key not in self.plans:
            try:
                graph, tensors = build()
                self._finish(graph)
                self.plans[key] = _Plan(graph, tensors, graph.get_workspace_size())
            except Exception as error:  # cuDNN reports unsupported configurations as exceptions
                self.plans[key] = None
                self.failures[key] = f"{type(error).__name__}: {error}"
        return self.plans[key]

    def _execute(self, plan: _Plan, buffers: dict[str, torch.Tensor]) -> None:
        self._bind_stream()
        workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=self.device)
        plan.graph.execute(
            {plan.tensors[name]: buffer for name, buffer in buffers.items()}, workspace, handle=self.handle
        )

    def _scalars(self, graph, names) -> dict[str, object]:
        types = self.cudnn.data_type
        return {
            name: graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=types.FLOAT)
            for name in names
        }

    def forward_plan(self, q8: torch.Tensor, out_dtype: torch.dtype) -> _Plan | None:
        dims, strides = cudnn_bhsd(q8)
        key = ("fwd", tuple(dims), tuple(strides), out_dtype)

        def build():
            types = self.cudnn.data_type
            graph = self._new_graph()
            tensors = {
                name: graph.tensor(name=name, dim=dims, stride=strides, data_type=types.FP8_E4M3)
                for name in ("q", "k", "v")
            }
            tensors.update(
                self._scalars(graph, ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"))
            )
            o, stats, amax_s, amax_o = graph.sdpa_fp8(
                q=tensors["q"],
                k=tensors["k"],
                v=tensors["v"],
                descale_q=tensors["descale_q"],
                descale_k=tensors["descale_k"],
                descale_v=tensors["descale_v"],
                descale_s=tensors["descale_s"],
                scale_s=tensors["scale_s"],
                scale_o=tensors["scale_o"],
                generate_stats=True,
                attn_scale=1.0 / math.sqrt(dims[3]),
                use_causal_mask=False,
            )
            o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(self._dtype(out_dtype))
            stats.set_output(True).set_data_type(types.FLOAT)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(types.FLOAT)
            tensors.update(o=o, stats=stats, amax_s=amax_s, amax_o=amax_o)
            return graph, tensors

        return self._plan(key, build)

    def backward_plan(
        self, q8: torch.Tensor, o: torch.Tensor, grad8: torch.Tensor, grad_dtype: torch.dtype
    ) -> _Plan | None:
        dims, strides = cudnn_bhsd(q8)
        key = ("bwd", tuple(dims), tuple(strides), o.dtype, grad8.dtype, grad_dtype)

        def build():
            types = self.cudnn.data_type
            graph = self._new_graph()
            tensors = {
                name: graph.tensor(name=name, dim=dims, stride=strides, data_type=types.FP8_E4M3)
                for name in ("q", "k", "v")
            }
            tensors["o"] = graph.tensor(name="o", dim=dims, stride=strides, data_type=self._dtype(o.dtype))
            tensors["dO"] = graph.tensor(name="dO", dim=dims, stride=strides, data_type=self._dtype(grad8.dtype))
            tensors["stats"] = graph.tensor(
                name="stats", dim=dims[:3] + [1], stride=[dims[1] * dims[2], dims[2], 1, 1], data_type=types.FLOAT
            )
            tensors.update(
                self._scalars(
                    graph,
                    (
                        "descale_q",
                        "descale_k",
                        "descale_v",
                        "descale_o",
                        "descale_dO",
                        "descale_s",
                        "descale_dP",
                        "scale_s",
                        "scale_dQ",
                        "scale_dK",
                        "scale_dV",
                        "scale_dP",
                    ),
                )
            )
            dq, dk, dv, amax_dq, amax_dk, amax_dv, amax_dp = graph.sdpa_fp8_backward(
                q=tensors["q"],
                k=tensors["k"],
                v=tensors["v"],
                o=tensors["o"],
                dO=tensors["dO"],
                stats=tensors["stats"],
                descale_q=tensors["descale_q"],
                descale_k=tensors["descale_k"],
                descale_v=tensors["descale_v"],
                descale_o=tensors["descale_o"],
                descale_dO=tensors["descale_dO"],
                descale_s=tensors["descale_s"],
                descale_dP=tensors["descale_dP"],
                scale_s=tensors["scale_s"],
                scale_dQ=tensors["scale_dQ"],
                scale_dK=tensors["scale_dK"],
                scale_dV=tensors["scale_dV"],
                scale_dP=tensors["scale_dP"],
                attn_scale=1.0 / math.sqrt(dims[3]),
                use_causal_mask=False,
            )
            for grad in (dq, dk, dv):
                grad.set_output(True).set_dim(dims).set_stride(strides).set_data_type(self._dtype(grad_dtype))
            for amax in (amax_dq, amax_dk, amax_dv, amax_dp):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(types.FLOAT)
            tensors.update(dQ=dq, dK=dk, dV=dv, amax_dQ=amax_dq, amax_dK=amax_dk, amax_dV=amax_dv, amax_dP=amax_dp)
            return graph, tensors

        return self._plan(key, build)

    def run_forward(self, plan: _Plan, q8, k8, v8, descales, out_dtype, output_scale):
        b, s, h, d = q8.shape
        out = torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
        stats = torch.empty(b, h, s, 1, dtype=torch.float32, device=q8.device)
        amax_s, amax_o = (torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q8.device) for _ in range(2))
        self._execute(
            plan,
            dict(
                q=q8,
                k=k8,
                v=v8,
                descale_q=_scalar(descales[0]),
                descale_k=_scalar(descales[1]),
                descale_v=_scalar(descales[2]),
                descale_s=_scalar(torch.full_like(descales[0], 1 / PROBABILITY_SCALE)),
                scale_s=_scalar(torch.full_like(descales[0], PROBABILITY_SCALE)),
                scale_o=_scalar(output_scale),
                o=out,
                stats=stats,
                amax_s=amax_s,
                amax_o=amax_o,
            ),
        )
        return out, stats

    def run_backward(self, plan: _Plan, saved, grad8, scalars, grad_scales, grad_dtype):
        """(dQ, dK, dV in grad_dtype scaled by grad_scales [3], their amaxes [3] before scaling)."""
        q8, k8, v8, o, stats = saved
        grads = [torch.empty(q8.shape, dtype=grad_dtype, device=q8.device) for _ in range(3)]
        amaxes = torch.empty(4, dtype=torch.float32, device=q8.device)
        probability = torch.full((1, 1, 1, 1), PROBABILITY_SCALE, dtype=torch.float32, device=q8.device)
        buffers = dict(
            q=q8,
            k=k8,
            v=v8,
            o=o,
            dO=grad8,
            stats=stats,
            dQ=grads[0],
            dK=grads[1],
            dV=grads[2],
            amax_dQ=amaxes[0:1],
            amax_dK=amaxes[1:2],
            amax_dV=amaxes[2:3],
            amax_dP=amaxes[3:4],
            scale_dQ=_scalar(grad_scales[0]),
            scale_dK=_scalar(grad_scales[1]),
            scale_dV=_scalar(grad_scales[2]),
            descale_s=probability.reciprocal(),
            scale_s=probability,
        )
        buffers.update({name: _scalar(value) for name, value in scalars.items()})
        self._execute(plan, buffers)
        return grads, amaxes[:3]


_runners: dict[int, CudnnFP8Attention] = {}
_runners_lock = threading.Lock()
_reported: set = set()


def _runner(device: torch.device) -> CudnnFP8Attention:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _runners_lock:
        if index not in _runners:
            _runners[index] = CudnnFP8Attention(torch.device("cuda", index))
        return _runners[index]


def _report_fallback(runner: CudnnFP8Attention, what: str) -> None:
    failed = [key for key in runner.failures if key not in _reported]
    for key in failed:
        _reported.add(key)
        warnings.warn(
            f"cuDNN has no FP8 {what} kernel for {key}; that attention runs in 16-bit ({runner.failures[key]})"
        )


class FP8AttentionState:
    """Scales of the FP8 gradients dQ, dK, dV of one attention layer (delayed scaling).

    cuDNN writes these tensors in FP8 on Hopper and needs their scales before it computes them, so they
    come from the amaxes of earlier calls: the maximum over the last ``history_len`` calls, with 2^margin
    headroom. Every call checks the amaxes cuDNN reports; when one exceeds what its scale allows, the
    backward runs again with scales from those amaxes (as the very first call does), so a gradient
    never saturates.
    """

    def __init__(self, history_len: int = 16, margin: int = 1):
        self.history_len, self.margin = history_len, margin
        self.amax_history: torch.Tensor | None = None  # [history_len, 3]
        self.reruns = 0

    def scales(self, max_value: float, device) -> torch.Tensor | None:
        """Scales [3] for dQ, dK, dV, or None before the first call (nothing recorded yet)."""
        if self.amax_history is None:
            return None
        amax = self.amax_history.to(device).amax(0) * 2.0**self.margin
        return quantization_scales(amax, max_value)[0]

    def record(self, amax: torch.Tensor) -> None:
        amax = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax)).float().reshape(1, 3)
        if self.amax_history is None:
            self.amax_history = amax.expand(self.history_len, 3).clone()
        else:
            self.amax_history = torch.cat([amax, self.amax_history[:-1].to(amax.device)])

    def state_dict(self) -> dict[str, object]:
        history = None if self.amax_history is None else self.amax_history.detach().cpu().clone()
        return {"amax_history": history, "history_len": self.history_len, "margin": self.margin}

    def load_state_dict(self, state: dict[str, object]) -> None:
        history = state.get("amax_history")
        if history is not None:
            history = history.float()[: self.history_len]
            if len(history) < self.history_len:
                history = torch.cat([history, history[-1:].expand(self.history_len - len(history), 3)])
        self.amax_history = history


class _FP8AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gradient_format: str, state: FP8AttentionState):
        runner = _runner(q.device)
        dtype = q.dtype
        amax = _amax3(q, k, v)
        scales, descales = quantization_scales(amax, E4M3.max_value)
        # The casts read strided views (v of a fused q/k/v GEMM) directly; cuDNN gets dense 8-bit copies.
        q8, k8, v8 = (
            _scaled_cast(t, scales[i], E4M3.max_value, torch.float8_e4m3fn).contiguous()
            for i, t in enumerate((q, k, v))
        )
        plan = runner.forward_plan(q8, torch.float8_e4m3fn)
        if plan is None:
            _report_fallback(runner, "forward")
            raise _Unsupported()
        # O is a convex combination of rows of V, so |O| <= amax(V): that bound is O's FP8 scale.
        o8, stats = runner.run_forward(plan, q8, k8, v8, descales, torch.float8_e4m3fn, scales[2])
        ctx.save_for_backward(q8, k8, v8, o8, stats, amax, descales)
        ctx.gradient_format, ctx.dtype, ctx.state = gradient_format, dtype, state
        return _dequantize(o8, descales[2], dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q8, k8, v8, o8, stats, amax, descales = ctx.saved_tensors
        runner, state = _runner(q8.device), ctx.state
        fmt = GRADIENT_FORMATS[ctx.gradient_format]
        grad_out = grad_out.contiguous()
        grad_amax = _amax(grad_out)
        grad_scale, grad_descale = quantization_scales(grad_amax, fmt.max_value)
        grad8 = _scaled_cast(grad_out, grad_scale, fmt.max_value, fmt.torch_dtype)
        dp_scale, dp_descale = gradient_product_descale(grad_amax, amax[2], q8.shape[-1], fmt.max_value)
        scalars = dict(
            descale_q=descales[0],
            descale_k=descales[1],
            descale_v=descales[2],
            descale_o=descales[2],
            descale_dO=grad_descale,
            descale_dP=dp_descale,
            scale_dP=dp_scale,
        )
        plan = runner.backward_plan(q8, o8, grad8, fmt.torch_dtype)
        if plan is None:
            _report_fallback(runner, "backward")
            raise RuntimeError(
                f"cuDNN has no FP8 attention backward for q {tuple(q8.shape)}: {list(runner.failures.values())[-1]}"
            )

        def run(grad_scales):
            return runner.run_backward(plan, (q8, k8, v8, o8, stats), grad8, scalars, grad_scales, fmt.torch_dtype)

        grad_scales = state.scales(fmt.max_value, q8.device)
        first = grad_scales is None
        grads8, grad_amax3 = run(torch.ones(3, device=q8.device) if first else grad_scales)
        if first or bool((grad_amax3 * grad_scales > fmt.max_value).any()):
            state.reruns += int(not first)
            grad_scales = quantization_scales(grad_amax3 * 2.0**state.margin, fmt.max_value)[0]
            grads8, grad_amax3 = run(grad_scales)
        state.record(grad_amax3)
        dq, dk, dv = _dequantize3(*grads8, grad_scales, ctx.dtype)
        return dq, dk, dv, None, None


class _Unsupported(Exception):
    pass


def fp8_dot_product_attention(q, k, v, gradient_format: str = "hybrid", state: FP8AttentionState | None = None):
    """softmax(q k^T / sqrt(d)) v in FP8 on cuDNN; q, k, v [B, N, heads, head_dim] in bf16/fp16.

    gradient_format: "hybrid" (E5M2 gradients; the only one, see the module docstring). ``state``
    keeps the scales of dQ, dK, dV between calls (one per attention layer); without one, every backward
    calibrates its scales by running twice. Falls back
    to the 16-bit kernel (dot_product_attention) where FP8 cannot run: CPU, pre-Hopper GPUs, no cuDNN
    frontend, unequal query and key counts, or a shape cuDNN has no FP8 kernel for.
    """
    if gradient_format not in GRADIENT_FORMATS:
        raise ValueError(f"gradient_format must be one of {sorted(GRADIENT_FORMATS)}, got {gradient_format!r}")
    if not fp8_attention_supported(q) or q.shape != k.shape or k.shape != v.shape:
        return dot_product_attention(q, k, v)
    try:
        return _FP8AttentionFunction.apply(q, k, v, gradient_format, state or FP8AttentionState())
    except _Unsupported:
        return dot_product_attention(q, k, v)
