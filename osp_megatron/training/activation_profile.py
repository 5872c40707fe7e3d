"""Activation bytes of the DiT measured on the model itself: what the backward keeps, and how far it rises.

One real block (and the embeddings, head and loss around it) runs a CPU forward and backward at small token
grids under the chosen precision, recipe and tensor-parallel size; the bytes follow from the tensors autograd
saves (torch.autograd.graph.saved_tensors_hooks) and the gradients in flight, and are linear in the tokens.

Method, per block kind (full / sparse) and tensor-parallel size (1 and 2: a one-process fake process group
stands in for the peer ranks, so every tensor has this rank's shape; collectives return their input):
- kept: unique storages (views share one) saved for the backward inside the block, plus the block's input,
  without parameters and the tensors every block shares (text states, modulation, RoPE tables). Measured
  for every checkpointing mode (torch.utils.checkpoint saves its inputs through the same hooks). Saved
  tensors computed from the block's weights alone (16-bit weight copies) are reported apart: they do not
  grow with the tokens and FSDP's unsharded bf16 weights replace them.
- rise: during the block's backward (no checkpointing), the largest increase of saved plus gradient bytes
  still alive over their level when the block's backward starts; the attention backward's float32 dQ
  accumulator (flash / cuDNN kernels, size of q) is added inside the attention node. A checkpointed block
  first rebuilds what it did not keep (none-mode kept minus its own kept bytes) and then rises the same way.
- outside: the same for the patch/text/time embeddings, layout moves, output head and loss, which scale
  with the whole token grid (the head runs on every token on every sequence-parallel rank).
Three grids of 1, 2 and 3 frames fit bytes = per_token x tokens + constant and check that the third is on the
line. The fused element-wise pieces are compiled as on GPUs (compiled graphs save far less than eager ones: 57
vs 109 bytes per token and channel for a wan-1.3b block), with OSP_MEGATRON_COMPILE=partition: inductor's
decompositions and forward/backward partition, hence its saved tensors, run eagerly without generating kernels.
"""

import contextlib
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Token grids per measurement: T in {1, 2, 3} frames of a small H x W (6 x 8 when the target grid needs
# Skiparse padding, 8 x 8 otherwise, so that packed or plain sparse layouts run as they will at scale).
FRAMES = (1, 2, 3)
MODES = ("none", "full", "selective")
# The model settings a block's activations depend on (with the sparse ratio, for the one-block model).
_BLOCK_FIELDS = (
    "dim",
    "num_heads",
    "ffn_dim",
    "text_dim",
    "text_len",
    "in_channels",
    "out_channels",
    "freq_dim",
    "cross_attn_norm",
)


@dataclass(frozen=True)
class ProfileRequest:
    """Everything that decides the activation bytes of a block, apart from the token count."""

    dim: int
    num_heads: int
    ffn_dim: int
    text_dim: int
    text_len: int
    in_channels: int
    out_channels: int
    patch_size: tuple
    freq_dim: int
    cross_attn_norm: bool
    sparse_ratio: int
    kind: str  # "full" or a sparse kind ("token")
    padded: bool  # whether the target grid needs Skiparse padding
    tensor: int
    precision: str  # "bf16" (autocast) or "fp32"
    recipe: str  # quant.recipe of the block linears
    compiled: bool = True

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def request_for(
    model_config, kind: str, padded: bool, tensor: int, precision: str, recipe: str, compiled: bool = True
) -> ProfileRequest:
    fields = {name: getattr(model_config, name) for name in _BLOCK_FIELDS}
    sparse = kind != "full"
    return ProfileRequest(
        **fields,
        patch_size=tuple(model_config.patch_size),
        sparse_ratio=model_config.sparse_ratio if sparse else 1,
        kind="token" if sparse else "full",
        padded=padded and sparse,
        tensor=tensor,
        precision=precision,
        recipe=recipe,
        compiled=compiled,
    )


# -- counting ----------------------------------------------------------------------------------------------
def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _weak_storage(tensor: torch.Tensor) -> StorageWeakRef:
    """A weak reference to the memory of `tensor`: expired() once every tensor viewing it is gone."""
    return StorageWeakRef(tensor.untyped_storage())


def _tensors_in(value):
    """Every tensor inside nested tuples, lists, dicts and dataclasses (a block's non-hidden arguments)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors_in(getattr(value, name))


def _from_parameters_only(tensor: torch.Tensor, parameters: set) -> bool:
    """Whether autograd reaches nothing but `parameters` from `tensor` (a cast or concatenation of weights)."""
    if tensor.grad_fn is None:
        return False
    stack, seen, leaves = [tensor.grad_fn], set(), 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in parameters:
                return False
            leaves += 1
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves > 0


class SavedTensorCensus:
    """Storages autograd saves, by region ("block" or "outside"), with weak references to see them freed."""

    def __init__(self, model: torch.nn.Module, block: torch.nn.Module):
        self.parameter_storages = {_storage_key(p) for p in model.parameters()}
        self.block_parameters = {id(p) for p in block.parameters()}
        self.entries = {}  # storage key -> [nbytes, weak ref, region, from parameters only]
        # storage key -> weak reference of the block's hidden input / shared inputs (a key alone could later
        # name another storage at the same address)
        self.shared, self.block_inputs, self.in_block = {}, {}, False
        self.block, self.block_output = block, None

    def _enter(self, module, args, kwargs):
        self.in_block = True
        self.block_inputs[_storage_key(args[0])] = _weak_storage(args[0])
        self.shared.update((_storage_key(t), _weak_storage(t)) for t in _tensors_in((args[1:], kwargs)))

    def _leave(self, module, args, kwargs, output):
        self.in_block = False
        self.block_output = output

    def pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        known = self.entries.get(key)
        # A storage freed during the forward (its graph branch dropped) may leave its address to a new one.
        if key not in self.parameter_storages and (known is None or known[1].expired()):
            region = "block" if self.in_block else "outside"
            self.entries[key] = [
                tensor.untyped_storage().nbytes(),
                _weak_storage(tensor),
                region,
                self.in_block and _from_parameters_only(tensor, self.block_parameters),
            ]
        return tensor

    @contextlib.contextmanager
    def recording(self):
        """Count what the forward inside this block saves (the backward may run after it)."""
        handles = [
            self.block.register_forward_pre_hook(self._enter, with_kwargs=True),
            self.block.register_forward_hook(self._leave, with_kwargs=True),
        ]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def kept(self) -> dict:
        """Bytes saved for the backward and still alive (call it while the graph is): block (tokens), block
        (weights only), outside."""
        totals = {"block": 0, "block_weights": 0, "outside": 0}
        for key, (nbytes, reference, region, weights_only) in self.entries.items():
            if reference.expired():
                continue
            if key in self.shared and not self.shared[key].expired():
                region = "outside"
            elif key in self.block_inputs and not self.block_inputs[key].expired():
                region = "block"
            totals["block_weights" if region == "block" and weights_only else region] += nbytes
        return totals

    def alive(self) -> int:
        return sum(entry[0] for entry in self.entries.values() if not entry[1].expired())


def _attention_query_numel(node) -> int:
    """Elements of q for a fused attention backward node (flash / cuDNN / efficient / CPU flash), else 0."""
    if "DotProductAttention" not in type(node).__name__:
        return 0
    query = getattr(node, "_saved_query", None)
    return 0 if query is None else query.numel()


def _graph_nodes(root) -> list:
    stack, seen = [root], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen[node] = None
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(seen)


def block_nodes(output: torch.Tensor, input_nodes) -> set:
    """autograd nodes reached from a block's `output` before the nodes that made its inputs or a leaf."""
    stop = set(input_nodes)
    stack, nodes = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in nodes or node in stop or hasattr(node, "variable"):
            continue
        nodes.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


class BackwardCensus:
    """Live saved + gradient bytes before and after every autograd node of one backward.

    Gradients that become parameter gradients (those entering AccumulateGrad nodes) are model state, counted
    per parameter elsewhere, and are left out of every sample.
    """

    def __init__(self, census: SavedTensorCensus, loss: torch.Tensor, in_block: set):
        self.census, self.in_block = census, in_block
        # One entry per gradient storage [nbytes, weak ref]; `current` maps an address to the entry of the storage
        # there now (an address freed by one gradient is often reused by the next).
        self.gradients, self.current = [], {}
        self.parameter_gradients = set()  # entries that became parameter gradients
        self.samples = []  # (in block, saved bytes alive, gradient entries alive, workspace bytes)
        for node in _graph_nodes(loss.grad_fn):
            node.register_prehook(lambda grads, node=node: self._sample(node, grads, before=True))
            node.register_hook(lambda inputs, grads, node=node: self._sample(node, inputs, before=False))

    def _entry(self, tensor: torch.Tensor) -> int:
        key = _storage_key(tensor)
        index = self.current.get(key)
        if index is None or self.gradients[index][1].expired():
            index = self.current[key] = len(self.gradients)
            self.gradients.append([tensor.untyped_storage().nbytes(), _weak_storage(tensor)])
        return index

    def _sample(self, node, tensors, before: bool):
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                index = self._entry(tensor)
                if hasattr(node, "variable"):
                    self.parameter_gradients.add(index)
        alive = frozenset(index for index in self.current.values() if not self.gradients[index][1].expired())
        # Inside a fused attention backward the kernel holds a float32 dQ accumulator the size of q.
        workspace = 4 * _attention_query_numel(node) if before else 0
        self.samples.append((node in self.in_block, self.census.alive(), alive, workspace))

    def rises(self) -> dict:
        """Levels over the start, sample by sample: "block" over the level at the block's first node (its
        samples only), "outside" over the level when the backward starts (the samples outside the block)."""

        def live(sample):
            _, saved, alive, workspace = sample
            return (
                saved
                + workspace
                + sum(self.gradients[index][0] for index in alive if index not in self.parameter_gradients)
            )

        levels = [(sample[0], live(sample)) for sample in self.samples]
        first_block = next(level for in_block, level in levels if in_block)
        return {
            "block": [level - first_block for in_block, level in levels if in_block],
            "outside": [level - levels[0][1] for in_block, level in levels if not in_block],
        }


# -- one measurement -----------------------------------------------------------------------------------------
def _start_fake_tensor_parallel(tensor: int) -> None:
    """A one-process world of `tensor` ranks whose collectives do nothing (torch's fake process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as error:  # a torch build without its testing package
        raise RuntimeError("measuring activation bytes needs torch.testing (torch's fake process group)") from error
    dist.init_process_group("fake", rank=0, world_size=tensor, store=FakeStore())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor, order="tp-cp-ep-dp-pp", create_gloo_process_groups=False
    )


def _stop_fake_tensor_parallel() -> None:
    from osp_megatron.parallel.state import destroy_distributed

    destroy_distributed()


def _measurement_model(request: ProfileRequest):
    from osp_megatron.config.loader import from_dict
    from osp_megatron.models.builder import build_model
    from osp_megatron.models.config import ModelConfig
    from osp_megatron.quantization import QuantConfig, apply_quantization

    fields = {name: getattr(request, name) for name in (*_BLOCK_FIELDS, "sparse_ratio")}
    config = from_dict(
        ModelConfig,
        {
            **fields,
            "patch_size": list(request.patch_size),
            "num_layers": 1,
            "block_layout": [request.kind],
            "full_blocks": 0,
        },
        "model",
    )
    torch.manual_seed(0)
    model = build_model(config, meta=True).to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    if request.recipe != "none":
        apply_quantization(model, from_dict(QuantConfig, {"recipe": request.recipe}, "quant"))
    return model


def _precision(request: ProfileRequest):
    """The trainer's precision: bf16 autocast without weight cache, or plain float32."""
    if request.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def _run(model, request: ProfileRequest, grid, mode: str) -> dict:
    """Kept bytes of one forward in `mode`; with mode "none" also the backward's rises."""
    from osp_megatron.training.flow_matching import flow_matching_loss

    model.activation_checkpointing = mode
    block = model.blocks[0]
    census = SavedTensorCensus(model, block)
    inputs = []
    # The autograd nodes that made the block's inputs (held as nodes: the tensors' Python objects may go).
    handle = block.register_forward_pre_hook(
        lambda module, args: inputs.extend(t.grad_fn for t in _tensors_in(args) if t.grad_fn is not None)
    )
    latent = [size * patch for size, patch in zip(grid, request.patch_size)]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, request.in_channels, *latent, generator=generator)
    text = torch.randn(1, request.text_len, request.text_dim, generator=generator)
    with _precision(request), census.recording():
        loss = flow_matching_loss(model, latents, text, generator)
    handle.remove()
    result = census.kept()
    if mode == "none":
        graph = block_nodes(census.block_output, inputs)
        census.block_output = None
        backward = BackwardCensus(census, loss, graph)
        # Under autocast like the forward: megatron's row-parallel linears restore autocast in their backward
        # for CUDA only, and would multiply a bf16 gradient by a float32 weight on the CPU.
        with _precision(request):
            loss.backward()
        result.update({f"rise_{name}": value for name, value in backward.rises().items()})
        model.zero_grad(set_to_none=True)
    return result


def _fit_timeline(tokens, timelines, what: str) -> list:
    """[(per_token, constant)] of every backward sample: each is linear in the tokens, their maximum is not
    (the peak moves from weight-gradient copies at few tokens to activation gradients at many), so the
    maximum is taken at the target's token count."""
    if len({len(timeline) for timeline in timelines}) != 1:
        raise RuntimeError(f"{what}: the backward ran a different number of nodes at different token counts")
    fits = [_fit(list(zip(tokens, levels)), what) for levels in zip(*timelines)]
    return [[fit["per_token"], fit["constant"]] for fit in fits]


def _fit(points, what: str) -> dict:
    """(per_token, constant) of bytes = per_token x tokens + constant through the first two points; the
    third must lie on the line (to 1 % or 64 KiB)."""
    (n1, y1), (n2, y2), (n3, y3) = points
    per_token = (y2 - y1) / (n2 - n1)
    constant = y1 - per_token * n1
    predicted = per_token * n3 + constant
    if abs(predicted - y3) > max(0.01 * abs(y3), 65536):
        raise RuntimeError(f"{what}: bytes are not linear in the tokens ({points}); cannot extrapolate")
    return {"per_token": per_token, "constant": constant}


def measure(request: ProfileRequest) -> dict:
    """The profile of `request`: for each quantity, bytes per token (B=1) and constant bytes."""
    _start_fake_tensor_parallel(request.tensor)
    try:
        model = _measurement_model(request)
        height, width = (6, 8) if request.padded else (8, 8)
        runs = {mode: [] for mode in MODES}
        tokens = []
        for frames in FRAMES:
            grid = (frames, height, width)
            tokens.append(frames * height * width)
            for mode in MODES:
                runs[mode].append(_run(model, request, grid, mode))
    finally:
        _stop_fake_tensor_parallel()
    profile = {}
    for name in ("block", "block_weights", "outside"):
        profile[name] = _fit(list(zip(tokens, (run[name] for run in runs["none"]))), name)
    for name in ("rise_block", "rise_outside"):
        profile[name] = _fit_timeline(tokens, [run[name] for run in runs["none"]], name)
    for mode in ("full", "selective"):
        for name in ("block", "block_weights"):
            profile[f"{name}_{mode}"] = _fit(list(zip(tokens, (run[name] for run in runs[mode]))), f"{name} {mode}")
    return profile


def main(argv=None) -> int:
    """`python -m osp_megatron.training.activation_profile REQUESTS_JSON`: print the profiles as JSON."""
    requests = [
        ProfileRequest(**{**fields, "patch_size": tuple(fields["patch_size"])})
        for fields in json.loads((argv or sys.argv[1:])[0])
    ]
    print(json.dumps([measure(request) for request in requests]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
