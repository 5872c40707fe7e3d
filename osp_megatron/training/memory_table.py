"""The planning table of docs/memory.md: peak memory per GPU of wan-1.3b and wan-14b on 1 to 64 GPUs.

Rows are the layouts that make sense at each GPU count; columns the checkpointing modes. Regenerate with
`python -m osp_megatron.training.memory_table --table` after anything changes what a block saves.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.ssp import check_sequence_parallel_layout
from osp_megatron.training.memory import GIB, Layout, Run, estimate

# VAE latents of 81 frames (21 latent frames) at the OSP-Next training resolutions.
RESOLUTIONS = {"480P": (21, 60, 104), "720P": (21, 90, 160), "768P": (21, 96, 160)}
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
MODELS = ("wan-1.3b", "wan-14b")
MODES = ("none", "selective", "full")
# Sequence and tensor parallelism stay inside one 8-GPU node; data parallelism spans nodes.
NODE = 8


def preset_model(name: str, mode: str = "none") -> ModelConfig:
    """The preset as trained: hybrid 1:4 full:Skiparse (P = 2) with the given checkpointing mode."""
    return from_dict(ModelConfig, {"preset": name, "sparse_ratio": 2, "activation_checkpointing": mode}, "model")


def _valid(model, latent, tensor: int, ssp: int, ulysses: int) -> bool:
    grid = tuple(size // patch for size, patch in zip(latent, model.patch_size))
    try:
        check_sequence_parallel_layout(model, grid, tensor, ssp, ulysses)
    except Exception:  # ConfigError: the heads or the grid do not split
        return False
    return model.num_heads % tensor == 0


def layouts(model, latent, gpus: int) -> list:
    """(name, Layout) rows for `gpus` GPUs: FSDP with the most sequence parallelism that fits a node, FSDP
    alone over data parallel ranks, and tensor parallelism with replicated data parallelism."""
    rows = []
    context_options = [
        (ssp, ulysses)
        for ssp in (4, 2, 1)
        for ulysses in (8, 4, 2, 1)
        if ssp * ulysses <= min(gpus, NODE) and gpus % (ssp * ulysses) == 0 and _valid(model, latent, 1, ssp, ulysses)
    ]
    ssp, ulysses = max(context_options, key=lambda option: (option[0] * option[1], option[0]))
    if ssp * ulysses > 1:
        rows.append(("FSDP + SP", Layout(data=gpus // (ssp * ulysses), ssp=ssp, ulysses=ulysses, fsdp=True)))
    rows.append(("FSDP" if gpus > 1 else "one GPU", Layout(data=gpus, fsdp=gpus > 1)))
    tensor = max(t for t in (8, 4, 2, 1) if t <= min(gpus, NODE) and gpus % t == 0 and _valid(model, latent, t, 1, 1))
    if tensor > 1:
        rows.append(("TP + DP", Layout(tensor=tensor, data=gpus // tensor)))
    return rows


def planning_runs():
    """Every (model, resolution, gpus, layout name, mode, Run) of the table."""
    for name in MODELS:
        for resolution, latent in RESOLUTIONS.items():
            for gpus in GPU_COUNTS:
                for layout_name, layout in layouts(preset_model(name), latent, gpus):
                    for mode in MODES:
                        yield (
                            name,
                            resolution,
                            gpus,
                            layout_name,
                            mode,
                            Run(model=preset_model(name, mode), latent=latent, layout=layout),
                        )


def _cell(peak_gib: float, gpu_gib: float) -> str:
    return f"{peak_gib:.0f}" if peak_gib <= gpu_gib * 0.92 else f"~~{peak_gib:.0f}~~"


def planning_table(gpu_gib: float = 139.0, profiles=None) -> str:
    """Markdown tables, one per model and resolution: peak GiB per GPU by layout and checkpointing mode."""
    estimates = {}
    for name, resolution, gpus, layout_name, mode, run in planning_runs():
        estimates[(name, resolution, gpus, layout_name, mode)] = (run, estimate(run, profiles))
    out = []
    for name in MODELS:
        for resolution, latent in RESOLUTIONS.items():
            out.append(f"\n### {name}, {resolution} (latent {'x'.join(map(str, latent))}), bf16, micro-batch 1\n")
            out.append("| GPUs | layout | tokens / GPU | model state GiB | none | selective | full |")
            out.append("|---|---|---|---|---|---|---|")
            for gpus in GPU_COUNTS:
                for layout_name, layout in layouts(preset_model(name), latent, gpus):
                    cells = []
                    for mode in MODES:
                        run, result = estimates[(name, resolution, gpus, layout_name, mode)]
                        cells.append(_cell(result.peak_bytes / GIB, gpu_gib))
                    state = sum(line.gib for line in result.lines if line.section == "model state")
                    parts = [f"tensor {layout.tensor}"] if layout.tensor > 1 else []
                    parts += [f"ssp {layout.ssp}"] if layout.ssp > 1 else []
                    parts += [f"ulysses {layout.ulysses}"] if layout.ulysses > 1 else []
                    parts += [f"data {layout.data}"] if layout.data > 1 else []
                    detail = f" ({' x '.join(parts)})" if parts else ""
                    out.append(
                        f"| {gpus} | {layout_name}{detail} | {run.local_tokens:,} | {state:.0f} | "
                        + " | ".join(cells)
                        + " |"
                    )
    return "\n".join(out) + "\n"


def table_requests(compiled: bool = True) -> list:
    """The activation profiles the planning table needs (one per block kind, padding and tensor basis)."""
    from osp_megatron.training.activation_bytes import run_requests

    requests = {}
    for *_, run in planning_runs():
        tensor_basis = dataclasses.replace(run, layout=Layout(tensor=2))  # both tensor bases for every model
        for request in run_requests(tensor_basis, compiled).values():
            requests[request.key()] = request
    return list(requests.values())


def bench_requests(compiled: bool = True) -> list:
    """Profiles benchmarks/bench_memory.py and the example config compare with: wan-1.3b 480P hybrid in bf16
    and fp8_hybrid; the tiny hybrid model in float32 (bench --tiny on the CPU); examples/tiny_t2v.yaml."""
    from osp_megatron.training.activation_bytes import run_requests

    runs = [
        Run(model=preset_model("wan-1.3b"), latent=RESOLUTIONS["480P"], recipe=recipe)
        for recipe in ("none", "fp8_hybrid")
    ]
    runs.append(Run(model=preset_model("tiny"), latent=(2, 12, 16), precision="fp32"))
    runs.append(Run(model=from_dict(ModelConfig, {"preset": "tiny"}, "model"), latent=(3, 16, 16)))
    return [request for run in runs for request in run_requests(run, compiled).values()]


def _measure_presets() -> int:
    """Measure the profiles of the planning table and of benchmarks/bench_memory.py into the shipped file."""
    from osp_megatron.training.activation_bytes import SHIPPED, SOURCE_KEY, measure_in_subprocess, source_fingerprint

    requests = {request.key(): request for request in table_requests() + bench_requests()}
    stored = json.loads(Path(SHIPPED).read_text()) if Path(SHIPPED).is_file() else {}
    if stored.get(SOURCE_KEY) != source_fingerprint():  # block code changed since: measure everything again
        stored = {SOURCE_KEY: source_fingerprint()}
    missing = [request for key, request in requests.items() if key not in stored]
    # One process per width shares the compiled graphs; a wan-14b-wide block (weights and gradients: a few GiB
    # of CPU memory) gets a process of its own.
    batches = [
        [request for request in missing if request.dim == dim]
        for dim in sorted({request.dim for request in missing if request.dim < 4096})
    ]
    batches += [[request] for request in missing if request.dim >= 4096]
    for batch in batches:
        print(f"measuring {len(batch)} profile(s) of width {batch[0].dim}", file=sys.stderr, flush=True)
        for request, profile in zip(batch, measure_in_subprocess(batch)):
            stored[request.key()] = profile
        Path(SHIPPED).write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m osp_megatron.training.memory_table",
        description="The memory model's planning table (docs/memory.md) and the activation profiles it reads.",
        epilog="Examples: python -m osp_megatron.training.memory_table --table > table.md; "
        "python -m osp_megatron.training.memory_table --measure-presets (after changing what a block saves). "
        "For one config: osp-train --config my.yaml --estimate-memory",
    )
    parser.add_argument("--table", action="store_true", help="print the planning table (markdown)")
    parser.add_argument(
        "--measure-presets",
        action="store_true",
        help="measure the activation profiles of wan-1.3b and wan-14b blocks that the table and "
        "benchmarks/bench_memory.py need and store them with the package (CPU, up to an hour)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=139.0,
        help="GPU memory the table's strike-through marks compare with (default 139: an H200)",
    )
    args = parser.parse_args(argv)
    if not (args.table or args.measure_presets):
        parser.error("choose --table or --measure-presets")
    try:
        if args.measure_presets:
            _measure_presets()
        if args.table:
            print(planning_table(args.gpu_memory_gib))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
