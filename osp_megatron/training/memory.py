"""Memory model of a training run: bytes per GPU for model state, activations and transients, from the config.

Parameters are counted on the meta device with the real model builder; activation bytes come from
activation_profile (measured on the model itself, linear in the tokens). `osp-train --estimate-memory`
prints one config's estimate; `python -m osp_megatron.training.memory_table --table` writes the planning table.
"""

import functools
import json
import math
from dataclasses import dataclass, field

GIB = 2**30
# AdamW keeps two moments per parameter; the trainer's gradient all-reduce flattens buckets of this size.
ADAM_MOMENTS = 2
GRADIENT_BUCKET_BYTES = 256 * 2**20
BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the model on one tensor-parallel rank: all, one block, and those outside the blocks."""

    total: int
    block: int  # the largest block (all blocks have the same parameters)
    outside: int  # embeddings, time projection, output head

    @property
    def blocks(self) -> int:
        return self.total - self.outside


def count_parameters(model_config, tensor: int = 1) -> ParameterCounts:
    """Count on the meta device (nothing allocated); tensor-parallel weights count 1 / tensor on a rank."""
    from osp_megatron.config.loader import to_dict

    fields = {**to_dict(model_config), "activation_checkpointing": "none"}  # the same parameters either way
    return _count_parameters(json.dumps(fields, sort_keys=True), tensor)


@functools.lru_cache(maxsize=16)
def _parameter_table(model_fields: str) -> tuple:
    """(block index or -1, elements, split by tensor parallelism) of every parameter of the meta model."""
    from osp_megatron.config.loader import from_dict
    from osp_megatron.models.builder import build_model
    from osp_megatron.models.config import ModelConfig

    model = build_model(from_dict(ModelConfig, json.loads(model_fields), "model"), meta=True)
    owner = {id(p): index for index, block in enumerate(model.blocks) for p in block.parameters()}
    return tuple(
        (owner.get(id(p), -1), p.numel(), bool(getattr(p, "tensor_model_parallel", False))) for p in model.parameters()
    )


def _count_parameters(model_fields: str, tensor: int) -> ParameterCounts:
    per_block, outside = {}, 0
    for block, numel, split in _parameter_table(model_fields):
        local = numel // tensor if split else numel
        if block < 0:
            outside += local
        else:
            per_block[block] = per_block.get(block, 0) + local
    return ParameterCounts(total=outside + sum(per_block.values()), block=max(per_block.values()), outside=outside)


@dataclass
class Layout:
    """How the run is spread: parallel degrees, FSDP and where the optimizer state and the EMA live."""

    tensor: int = 1
    data: int = 1
    ssp: int = 1
    ulysses: int = 1
    fsdp: bool = False
    fsdp_offload: bool = False
    reduce_dtype: str = "float32"
    ema_on_cpu: bool = False

    @property
    def world(self) -> int:
        return self.tensor * self.data * self.ssp * self.ulysses

    @property
    def context(self) -> int:
        return self.ssp * self.ulysses

    @property
    def shards(self) -> int:
        """Ranks FSDP shards over: data x SSP x Ulysses of one tensor-parallel rank (1 without FSDP)."""
        return self.data * self.context if self.fsdp else 1

    def describe(self) -> str:
        text = (
            f"{self.world} GPU{'s' if self.world > 1 else ''} = tensor {self.tensor} x ssp {self.ssp} x "
            f"ulysses {self.ulysses} x data {self.data}"
        )
        if self.fsdp:
            text += f"; FSDP over {self.shards} ranks (bf16 weights in compute, {self.reduce_dtype} reduction)"
            if self.fsdp_offload:
                text += ", optimizer state and fp32 weights on the CPU"
        return text + (", EMA on the CPU" if self.ema_on_cpu else "")


@dataclass
class Run:
    """What one step processes and how: model, token grid, micro-batch, precision, recipe, checkpointing."""

    model: object  # ModelConfig
    latent: tuple  # (frames, height, width) of the VAE latent
    micro_batch: int = 1
    accumulation: int = 1  # micro-batches per optimizer step (gradients stay allocated between them)
    precision: str = "bf16"
    recipe: str = "none"
    fp8_attention: bool = False
    ema: bool = True
    layout: Layout = field(default_factory=Layout)

    @property
    def grid(self) -> tuple:
        return tuple(size // patch for size, patch in zip(self.latent, self.model.patch_size))

    @property
    def hybrid(self) -> bool:
        return self.model.sparse_ratio > 1 and any(kind != "full" for kind in self.model.block_kinds())

    @property
    def padded_grid(self) -> tuple:
        from osp_megatron.attention.skiparse import padded_grid

        return padded_grid(self.grid, self.model.sparse_ratio) if self.hybrid else self.grid

    @property
    def needs_padding(self) -> bool:
        return self.padded_grid != self.grid

    @property
    def local_tokens(self) -> int:
        """Tokens of one sample a rank holds: sequence parallelism splits the (Skiparse-padded) grid; on one
        rank the packed sparse layout holds only the real tokens."""
        grid = self.padded_grid if self.layout.context > 1 else self.grid
        return math.prod(grid) // self.layout.context


def run_from_config(config) -> Run:
    """The Run of a JobConfig; keys added by FSDP (parallel.fsdp*, train.ema_device) are optional."""
    parallel, train = config.parallel, config.train
    layout = Layout(
        tensor=parallel.tensor,
        data=parallel.data or 1,
        ssp=parallel.ssp,
        ulysses=parallel.ulysses,
        fsdp=bool(getattr(parallel, "fsdp", False)),
        fsdp_offload=bool(getattr(parallel, "fsdp_offload", False)),
        reduce_dtype=getattr(parallel, "fsdp_reduce_dtype", "float32"),
        ema_on_cpu=getattr(train, "ema_device", "auto") == "cpu",
    )
    # "auto" is bf16 autocast on accelerators: the estimate is for GPUs unless the config pins the CPU.
    cpu = train.device == "cpu"
    precision = "fp32" if train.precision == "fp32" or (train.precision == "auto" and cpu) else "bf16"
    accumulation = max(1, train.global_batch_size // (train.micro_batch_size * layout.data))
    return Run(
        model=config.model,
        latent=(config.data.latent_frames, config.data.latent_height, config.data.latent_width),
        micro_batch=train.micro_batch_size,
        accumulation=accumulation,
        precision=precision,
        recipe=config.quant.recipe,
        fp8_attention=config.quant.attention,
        ema=train.ema_decay > 0,
        layout=layout,
    )


# -- the estimate ------------------------------------------------------------------------------------------
@dataclass
class Line:
    section: str
    name: str
    gib: float
    per_parameter: float = None  # bytes per parameter on this GPU, for model state


@dataclass
class Estimate:
    run: Run
    counts: ParameterCounts  # on one tensor-parallel rank
    model_parameters: int
    lines: list
    phases: dict  # phase name -> bytes
    notes: list

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def _state(run: Run, counts: ParameterCounts):
    """(per-parameter bytes on this GPU by item, FSDP in-flight bytes forward / backward) of the model state."""
    layout = run.layout
    param_bytes = BYTES[run.model.params_dtype]
    shards = layout.shards
    on_gpu = 0.0 if layout.fsdp_offload else 1.0
    items = {
        f"weights ({run.model.params_dtype})": param_bytes / shards * on_gpu,
        f"gradients ({run.model.params_dtype})": param_bytes / shards * on_gpu,
        f"AdamW moments (2 x {run.model.params_dtype})": ADAM_MOMENTS * param_bytes / shards * on_gpu,
    }
    if run.ema:  # beside each parameter's shard (host memory when the shards are offloaded) or on the CPU
        items["EMA (float32)"] = 0.0 if layout.ema_on_cpu else 4 / shards * on_gpu
    if not layout.fsdp:
        return items, 0, 0
    compute = 2 if run.precision == "bf16" else 4
    reduce = BYTES[layout.reduce_dtype]
    # parallel/fsdp.py: blocks gather their weights in the compute dtype, one block ahead (forward prefetch of
    # the next block, backward prefetch of the previous one); the root (embedders, output head) gathers its
    # float32 weights once per step and keeps them. The backward adds the running block's unsharded gradient
    # and its copy in the reduction dtype for the reduce-scatter.
    forward = 2 * counts.block * compute + counts.outside * param_bytes
    backward = forward + counts.block * (compute + (reduce if reduce != compute else 0))
    return items, forward, backward


def estimate(run: Run, profiles=None) -> Estimate:
    """Bytes per GPU of one training step of `run`, its largest phase and the items that make it up."""
    from osp_megatron.training.activation_bytes import activation_bytes

    counts = count_parameters(run.model, run.layout.tensor)
    items, inflight_forward, inflight_backward = _state(run, counts)
    gradient_bytes = items[f"gradients ({run.model.params_dtype})"]
    # Gradients are allocated during the backward (zero_grad frees them each step): counted per phase below.
    state_bytes = (sum(items.values()) - gradient_bytes) * counts.total
    grads_block, grads_outside = gradient_bytes * counts.block, gradient_bytes * counts.outside
    mode = run.model.activation_checkpointing
    activations = activation_bytes(run, profiles)
    kinds = ["full" if kind == "full" else "sparse" for kind in run.model.block_kinds()]
    kept = [activations[kind]["kept"][mode] for kind in kinds]
    rebuilt = [activations[kind]["kept"]["none"] for kind in kinds]
    rises = [activations[kind]["rise"] for kind in kinds]
    outside_kept, outside_rise = activations["outside"]["kept"], activations["outside"]["rise"]
    all_grads = gradient_bytes * counts.total
    # With gradient accumulation the previous micro-batches' gradients are allocated all along.
    held = all_grads if run.accumulation > 1 else 0
    phases = {"forward": state_bytes + inflight_forward + held + outside_kept + sum(kept) + rebuilt[-1] - kept[-1]}
    phases["backward (head)"] = (
        state_bytes + inflight_backward + max(held, grads_outside) + outside_kept + sum(kept) + outside_rise
    )
    blocks_peak = 0
    for index in range(len(kinds)):
        grads = max(held, grads_outside + grads_block * (len(kinds) - index))
        level = sum(kept[:index]) + rebuilt[index] + rises[index] + grads
        blocks_peak = max(blocks_peak, level)
    phases["backward (blocks)"] = state_bytes + inflight_backward + outside_kept + blocks_peak
    largest_parameter = max(run.model.ffn_dim * run.model.dim // run.layout.tensor, 1) * BYTES[run.model.params_dtype]
    bucket = GRADIENT_BUCKET_BYTES if run.layout.world > 1 and not run.layout.fsdp else 0
    phases["optimizer step"] = state_bytes + all_grads + max(bucket, largest_parameter / run.layout.shards)

    lines = [Line("model state", name, per_param * counts.total / GIB, per_param) for name, per_param in items.items()]
    if run.layout.fsdp:
        lines.append(Line("model state", "FSDP gathered weights and block gradients", inflight_backward / GIB))
    for kind in sorted(set(kinds), reverse=False):
        count = kinds.count(kind)
        lines.append(
            Line(
                "activations",
                f"{kind} block, kept ({mode}; {count} blocks), each",
                activations[kind]["kept"][mode] / GIB,
            )
        )
    lines.append(Line("activations", "embeddings, output head, loss: kept", outside_kept / GIB))
    lines.append(Line("activations", "all kept at the end of the forward", (outside_kept + sum(kept)) / GIB))
    worst = max(range(len(kinds)), key=lambda i: rebuilt[i] + rises[i] - kept[i])
    lines.append(
        Line(
            "activations",
            "one block's backward (rebuilt + in flight)",
            (rebuilt[worst] - kept[worst] + rises[worst]) / GIB,
        )
    )
    notes = activations["notes"]
    model_parameters = counts.total if run.layout.tensor == 1 else count_parameters(run.model).total
    return Estimate(run, counts, model_parameters, lines, phases, notes)


# -- printing ------------------------------------------------------------------------------------------------
def _row(name: str, per_parameter, gib: float, width: int) -> str:
    per_parameter = f"{per_parameter:6.2f} B/param" if per_parameter is not None else " " * 13
    return f"  {name:<{width}}{per_parameter}  {gib:8.2f} GiB"


def format_estimate(result: Estimate, gpu_gib: float = None) -> str:
    """The estimate as a table: model state per parameter, activations, the bytes of each phase, the peak."""
    run, counts, layout = result.run, result.counts, result.run.layout
    state_gib = sum(line.gib for line in result.lines if line.section == "model state")
    grid, padded = run.grid, run.padded_grid
    tokens = math.prod(grid)
    rank = f", {counts.total / 1e9:.2f} B on each tensor-parallel rank" if layout.tensor > 1 else ""
    out = [
        f"memory per GPU: {run.model.preset} ({result.model_parameters / 1e9:.2f} B parameters{rank}), "
        f"{run.precision}, quant {run.recipe}, activation checkpointing {run.model.activation_checkpointing}"
    ]
    grid_text = f"latent {'x'.join(map(str, run.latent))} -> tokens {'x'.join(map(str, grid))} = {tokens:,}"
    if padded != grid:
        grid_text += f" (Skiparse-padded {'x'.join(map(str, padded))} = {math.prod(padded):,})"
    out.append(
        f"  {grid_text}; {run.local_tokens:,} tokens per GPU per sample, micro-batch {run.micro_batch}"
        f"{f', accumulation {run.accumulation}' if run.accumulation > 1 else ''}"
    )
    out.append(f"  layout: {layout.describe()}")
    width = max(len(line.name) for line in result.lines) + 2
    section = None
    for line in result.lines:
        if line.section != section:
            if section == "model state":
                out.append(_row("total", sum(x.per_parameter or 0 for x in result.lines), state_gib, width))
            section = line.section
            out.append(f"{section}:")
        out.append(_row(line.name, line.per_parameter, line.gib, width))
    out.append("phases (allocated bytes):")
    for phase, value in result.phases.items():
        marker = "  <- peak" if phase == result.peak_phase else ""
        out.append(_row(phase, None, value / GIB, width) + marker)
    if gpu_gib:
        verdict = "fits" if result.peak_bytes / GIB <= gpu_gib * 0.92 else "does NOT fit"
        out.append(
            f"peak {result.peak_bytes / GIB:.1f} GiB {verdict} a {gpu_gib:g} GiB GPU (allowing 8 % for the "
            f"CUDA context and allocator fragmentation)"
        )
    out.extend(f"note: {note}" for note in result.notes)
    return "\n".join(out)


def estimate_config(config, gpu_gib: float = 139.0) -> str:
    """`osp-train --estimate-memory`: the formatted estimate of a JobConfig (no GPU, no process group)."""
    run = run_from_config(config)
    text = format_estimate(estimate(run), gpu_gib)
    if config.parallel.data is None:
        text += "\nnote: parallel.data is derived from the world size at launch; this estimate assumes data = 1"
    return text
