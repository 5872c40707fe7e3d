"""Activation bytes of a run: measured block profiles (shipped, cached or measured now) at its token counts.

Bytes at tensor-parallel size t are replicated + split / t, through the profiles measured at 1 and 2 ranks.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

from osp_megatron.training.activation_profile import request_for

# Profiles of the presets (python -m osp_megatron.training.memory_table --measure-presets writes them).
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "activation_profiles.json")


# The code that decides what a block saves; profiles record a fingerprint of it to tell when they are stale.
SOURCE_FILES = (
    "models/wan/layers.py",
    "models/wan/model.py",
    "models/wan/fused.py",
    "models/wan/spec.py",
    "attention/dispatch.py",
    "attention/skiparse.py",
    "parallel/layout.py",
    "quantization/gemm.py",
    "quantization/formats.py",
    "quantization/linear.py",
    "training/flow_matching.py",
)
SOURCE_KEY = "source"


def source_fingerprint() -> str:
    """sha256 (16 hex digits) of the files in SOURCE_FILES."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        with open(os.path.join(package, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "osp_megatron", "activation_profiles.json")


def _read(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def measure_in_subprocess(requests) -> list:
    """measure() of each request in a fresh Python process (its own fake process group, compile mode)."""
    profiles = []
    for compiled in (True, False):
        batch = [request for request in requests if request.compiled == compiled]
        if not batch:
            continue
        env = {**os.environ, "OSP_MEGATRON_COMPILE": "partition" if compiled else "0"}
        argument = json.dumps([asdict(request) for request in batch])
        result = subprocess.run(
            [sys.executable, "-m", "osp_megatron.training.activation_profile", argument],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"measuring activation bytes failed:\n{result.stderr[-3000:]}")
        profiles.extend(zip(batch, json.loads(result.stdout.strip().splitlines()[-1])))
    order = {request.key(): index for index, request in enumerate(requests)}
    return [profile for _, profile in sorted(profiles, key=lambda pair: order[pair[0].key()])]


def load_profiles(requests, measure_missing: bool = True) -> tuple:
    """({request key: profile}, notes) from the profiles shipped with the package, the user's cache, or
    measured now (then cached). Measuring a wan-14b-wide block runs it on the CPU: minutes, once per shape."""
    shipped, cached = _read(SHIPPED), _read(cache_path())
    fingerprint, notes = source_fingerprint(), []
    if cached.get(SOURCE_KEY) != fingerprint:  # measured on other block code: measure again
        cached = {SOURCE_KEY: fingerprint}
    found = {request.key(): shipped.get(request.key()) or cached.get(request.key()) for request in requests}
    if any(request.key() in shipped for request in requests) and shipped.get(SOURCE_KEY) != fingerprint:
        notes.append(
            "the stored activation profiles were measured on other block code; re-measure them with "
            "python -m osp_megatron.training.memory_table --measure-presets"
        )
    missing = [request for request in requests if found[request.key()] is None]
    if missing and not measure_missing:
        raise KeyError(f"no stored activation profile for {[request.key() for request in missing]}")
    if missing:
        print(
            f"[osp-train] measuring activation bytes of {len(missing)} block configuration(s) on the CPU "
            f"(once; cached in {cache_path()})",
            file=sys.stderr,
            flush=True,
        )
        for request, profile in zip(missing, measure_in_subprocess(missing)):
            found[request.key()] = cached[request.key()] = profile
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        with open(cache_path(), "w") as handle:
            json.dump(cached, handle, indent=1, sort_keys=True)
    return found, notes


def run_requests(run, compiled: bool = True) -> dict:
    """{(kind, tensor): ProfileRequest} a run's estimate needs: each block kind at tensor 1 (and 2 when the
    run uses tensor parallelism: bytes at tensor t are replicated + split / t, fitted through 1 and 2)."""
    kinds = {"full" if kind == "full" else "sparse" for kind in run.model.block_kinds()}
    tensors = (1, 2) if run.layout.tensor > 1 else (1,)
    recipe = run.recipe if run.recipe else "none"
    return {
        (kind, tensor): request_for(run.model, kind, run.needs_padding, tensor, run.precision, recipe, compiled)
        for kind in kinds
        for tensor in tensors
    }


def _at_tensor(values: dict, tensor: int) -> float:
    """Bytes at `tensor` ranks from the bytes at 1 and 2: replicated + split / tensor through both."""
    if tensor == 1:
        return values[1]
    replicated, split = 2 * values[2] - values[1], 2 * (values[1] - values[2])
    return replicated + split / tensor


def activation_bytes(run, profiles=None, compiled: bool = True) -> dict:
    """Bytes of one micro-batch on one GPU of `run`: per block kind the kept bytes by checkpointing mode and
    the backward's rise, and the same for the embeddings, head and loss ("outside"); plus notes."""
    requests = run_requests(run, compiled)
    notes = []
    if profiles is None:
        profiles, notes = load_profiles(list(requests.values()))
    batch, local, whole = run.micro_batch, run.local_tokens, math.prod(run.grid)
    # FSDP gathers bf16 weights itself (autocast makes no copies) and frees them after each block's forward.
    weights_kept = not (run.layout.fsdp and run.precision == "bf16")

    def value(kind, name, tokens, samples=batch) -> float:
        """Bytes of a fitted quantity for `samples` samples of `tokens` tokens; of a backward timeline, its
        largest point."""
        at = {}
        for tensor in (1, 2):
            if (kind, tensor) in requests:
                stored = profiles[requests[(kind, tensor)].key()][name]
                lines = [[stored["per_token"], stored["constant"]]] if isinstance(stored, dict) else stored
                at[tensor] = max((per_token * tokens + constant) * samples for per_token, constant in lines)
        return max(_at_tensor(at, run.layout.tensor), 0.0)

    result = {"notes": notes}
    for kind in {kind for kind, _ in requests}:
        kept = {}
        for mode, suffix in (("none", ""), ("full", "_full"), ("selective", "_selective")):
            weights = value(kind, f"block_weights{suffix}", 0, samples=1) if weights_kept else 0.0
            kept[mode] = value(kind, f"block{suffix}", local) + weights
        result[kind] = {"kept": kept, "rise": value(kind, "rise_block", local)}
    any_kind = next(kind for kind, _ in requests)
    result["outside"] = {"kept": value(any_kind, "outside", whole), "rise": value(any_kind, "rise_outside", whole)}
    if run.fp8_attention:
        result["notes"].append(
            "quant.attention: FP8 attention keeps q, k, v, o in 8 bits; counted here as the "
            "16-bit kernel's bytes (an upper bound)"
        )
    return result
