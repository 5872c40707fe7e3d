"""`osp-data encode` speed on one GPU with the full-size Wan2.1 VAE and a umT5-XXL-shaped text encoder.

Random weights (speed does not depend on them), bf16, 480P x 81-frame clips. Three cases (--cases):

- vae: the VAE alone on --vae-clips clips, diffusers' own `AutoencoderKLWan.encode` against VideoVAE's chunked
  encode per variant (--variants): ms per clip, peak GPU memory, and the latents' relative L2 and max abs error
  against diffusers' latents of the same clips. `high-precision` encodes one clip with diffusers in float32
  (no TF32): its error is the bf16 rounding of diffusers' own latents, the scale the others compare with.
- e2e: `encode_dataset` clips/s and peak memory on a shard of --clips clips (MP4 decode, both models, writing):
  the old path (diffusers' encode, no prefetch) against the new default (chunked encode, prefetch), and the
  fastest VAE variant with prefetch when it is not the default.
- batch: per batch size (--batch-sizes), decode, VAE and text-encoder times and the end-to-end clips/s, with the
  VAE as `osp-data encode` runs it by default on the device.

Variant names: `diffusers`, `diffusers-autotune` (cuDNN benchmark mode on), `c<N>` (chunks of N frames) with
`-cl` (channels-last-3d), `-fuse` (fused norm + SiLU, no padding copies) and `-compile` (torch.compile) suffixes,
and `high-precision`. Every variant runs in
try/except (out of memory included): a failure is recorded and the rest still run. Progress goes to stdout as it
happens and the JSON is rewritten after every measurement, so a run cut short keeps what it measured. --tiny
runs everything with tiny models in seconds on CPU.

    python benchmarks/bench_data_encode.py --out data_encode.json                      # vae + e2e, ~4 min
    python benchmarks/bench_data_encode.py --cases vae --variants diffusers,c20,c20-compile,c20-cl,c20-cl-compile \
        --max-warmup-s 400 --vae-budget-s 900 --out data_encode_compile.json          # compiled variants
    python benchmarks/bench_data_encode.py --cases batch --out data_encode_batch.json  # the per-batch-size table
"""

import argparse
import copy
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import timed, write_report  # noqa: E402

from osp_data.build import CLIPS_FORMAT  # noqa: E402
from osp_data.encode import Encoders, encode_dataset  # noqa: E402
from osp_megatron.data.buckets import Bucket  # noqa: E402
from osp_megatron.data.shards import ShardInfo, iter_raw_samples, write_index  # noqa: E402
from osp_megatron.data.video import decode_clip, encode_clip, to_model_input  # noqa: E402
from osp_megatron.models.text_encoder import ByteTokenizer, TextEncoder, tiny_umt5_config  # noqa: E402
from osp_megatron.models.vae import DEFAULT_CHUNK_FRAMES, VideoVAE, tiny_wan_vae  # noqa: E402

# umT5-XXL, the text encoder of Wan2.1 (5.7B parameters in the encoder).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
)
CAPTION = "a slow drift of colour bands across the frame, filmed in soft daylight with a gentle camera pan"
# In order of interest: what the time budget (--vae-budget-s) leaves out comes last.
DEFAULT_VARIANTS = (
    f"diffusers,high-precision,c{DEFAULT_CHUNK_FRAMES},c{DEFAULT_CHUNK_FRAMES}-cl,c{DEFAULT_CHUNK_FRAMES}-cl-fuse,"
    "c40-cl,c40-cl-fuse,c80-cl-fuse,c4-cl-fuse,diffusers-autotune"
)
TINY_VARIANTS = "diffusers,high-precision,c4,c8,c4-cl,c8-cl,c8-cl-fuse,diffusers-autotune"
# What osp-data encode runs on a GPU by default (chunks, channels-last, fused elementwise pieces).
GPU_DEFAULT_VARIANT = f"c{DEFAULT_CHUNK_FRAMES}-cl-fuse"


def full_size_autoencoder(device, dtype):
    """AutoencoderKLWan's default (Wan2.1) config, random weights, made on the device."""
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        return AutoencoderKLWan().to(dtype).eval().requires_grad_(False)


def full_size_text_encoder(device, dtype, text_layers):
    """umT5-XXL's shape with `text_layers` layers, random weights, made on the device."""
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        text_model = UMT5EncoderModel(UMT5Config(**dict(UMT5_XXL, num_layers=text_layers)))
    text_model = text_model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in text_model.named_parameters():
            param.fill_(1.0) if "layer_norm" in name else param.normal_(0.0, 0.02, generator=generator)
    return TextEncoder(text_model.to(dtype), ByteTokenizer(), 512, device)


def tiny_text_encoder(device):
    from transformers import UMT5EncoderModel

    return TextEncoder(UMT5EncoderModel(tiny_umt5_config(32)), ByteTokenizer(), 32, device)


def moving_clip(frames, height, width, seed):
    """uint8 [F, H, W, 3]: smooth colour gradients drifting over time, so the MP4 is realistically sized."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        for c in range(3):
            clip[t, :, :, c] = 127 + 120 * np.sin(xs / 37 + ys / 53 + t / 9 + phase[c])
    return clip


def write_clip_folder(folder, clips, frames, height, width, fps):
    """An `osp-data build`-style folder: one shard of `clips` MP4 clips in bucket height x width."""
    import json

    import webdataset

    bucket = Bucket(height, width)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{bucket.name}-000000.tar")
    with webdataset.TarWriter(path) as writer:
        for i in range(clips):
            writer.write(
                {
                    "__key__": f"clip{i:05d}",
                    "mp4": encode_clip(moving_clip(frames, height, width, i), fps),
                    "txt": CAPTION.encode(),
                    "json": json.dumps({"caption": CAPTION}).encode(),
                }
            )
    write_index(
        folder, [ShardInfo(path, clips, bucket.name)], format=CLIPS_FORMAT, fps=fps, frames=frames, buckets=bucket.name
    )
    return path


def peak_gib(device):
    """Peak GPU memory allocated since the last reset; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(device):
    """Free what a finished (or failed) measurement left, so the next one starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a broken CUDA context: the next measurements fail and say so
            log(f"cannot free GPU memory: {short_error(exc)}")


def log(message):
    print(message, flush=True)


def short_error(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


# -- case vae: the VAE alone, per variant ------------------------------------------------------------------------
def parse_variant(name):
    """A variant name -> VideoVAE options plus how the reference runs; SystemExit naming a bad one."""
    if name in ("diffusers", "diffusers-autotune", "high-precision"):
        return {"chunk_frames": None, "channels_last": False, "compile_encoder": False, "fuse_elementwise": False}
    parts = name.split("-")
    if not parts[0].startswith("c") or not parts[0][1:].isdigit() or set(parts[1:]) - {"cl", "compile", "fuse"}:
        raise SystemExit(
            f"--variants: unknown variant {name!r}; use diffusers, diffusers-autotune, high-precision or c<N> with "
            "-cl, -fuse and/or -compile, e.g. c20-cl-fuse"
        )
    return {
        "chunk_frames": int(parts[0][1:]),
        "channels_last": "cl" in parts,
        "compile_encoder": "compile" in parts,
        "fuse_elementwise": "fuse" in parts,
    }


def run_vae_variant(name, autoencoder, videos, reference, args, device):
    """One variant on every video (one untimed warm-up call first): its row, and its latents (None if it
    failed)."""
    options = parse_variant(name)
    row = {"variant": name, **options, "clips": len(videos) * args.vae_batch, "status": "ok"}
    latents = None
    release_memory(device)
    reset_peak(device)
    resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    cudnn_benchmark, tf32 = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    try:
        model = autoencoder
        if options["channels_last"]:  # its weights are converted in place: keep the shared one as it is
            model = copy.deepcopy(autoencoder)
        if name == "high-precision":  # diffusers in float32 without TF32 (float64 when the benchmark runs fp32)
            model = copy.deepcopy(autoencoder).to(torch.float64 if args.dtype == torch.float32 else torch.float32)
            torch.backends.cudnn.allow_tf32 = False
            videos = videos[:1]
            row["clips"] = args.vae_batch
        torch.backends.cudnn.benchmark = name == "diffusers-autotune" or cudnn_benchmark
        vae = VideoVAE(model, device, **options)
        tick = time.perf_counter()
        vae.encode(videos[0])
        row["warmup_s"] = round(time.perf_counter() - tick, 2)
        row["warmup_peak_gib"] = peak_gib(device)  # with cuDNN's algorithm trials, once per shape
        if row["warmup_s"] > args.max_warmup_s:
            raise TimeoutError(f"warm-up took {row['warmup_s']} s, over --max-warmup-s {args.max_warmup_s}")
        reset_peak(device)
        tick = time.perf_counter()
        latents = [vae.encode(video) for video in videos]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["ms_per_clip"] = (time.perf_counter() - tick) * 1e3 / row["clips"]
        row["peak_gib"] = peak_gib(device)
        # What one call adds on top of the weights and inputs already there (--vae-batch clips), after warm-up.
        row["activation_gib"] = row["peak_gib"] - resident if device.type == "cuda" else None
        if reference is not None:
            got, want = torch.cat(latents), torch.cat(reference[: len(latents)])
            row["rel_l2_vs_diffusers"] = float((got - want).norm() / want.norm())
            row["max_abs_vs_diffusers"] = float((got - want).abs().max())
    except Exception as exc:  # out of memory, a compile failure, a too slow warm-up: recorded, the rest go on
        row["status"], row["error"] = "failed", short_error(exc)
        row["peak_gib"] = peak_gib(device)
        latents = None
        if args.verbose:
            traceback.print_exc()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = cudnn_benchmark, tf32
        vae = model = None
    release_memory(device)
    return row, latents


def vae_case(autoencoder, clips, args, device, report):
    """Rows of every --variants variant; `diffusers` runs first, as the reference of the others' errors."""
    names = [name for name in args.variants.split(",") if name]
    for name in names:
        parse_variant(name)  # a typo fails before anything is measured
    names = sorted(names, key=lambda name: name != "diffusers")  # the reference first; the rest as given
    videos = [
        torch.stack([to_model_input(clip) for clip in clips[i : i + args.vae_batch]]).to(device, args.dtype)
        for i in range(0, len(clips) - args.vae_batch + 1, args.vae_batch)
    ]
    rows, reference, started = report["vae_variants"], None, time.perf_counter()
    log(f"[vae] {len(videos)} call(s) of {args.vae_batch} clip(s) per variant, {len(names)} variant(s)")
    for name in names:
        if time.perf_counter() - started > args.vae_budget_s:
            rows.append({"variant": name, "status": "skipped", "error": f"--vae-budget-s {args.vae_budget_s} spent"})
            log(f"[vae] {name:>20}: skipped (time budget)")
            continue
        row, latents = run_vae_variant(name, autoencoder, videos, reference, args, device)
        if name == "diffusers" and latents is not None:
            reference = latents
            row["rel_l2_vs_diffusers"] = row["max_abs_vs_diffusers"] = 0.0
        rows.append(row)
        base = next((r for r in rows if r["variant"] == "diffusers" and r["status"] == "ok"), None)
        if row["status"] == "ok" and base is not None:
            row["speedup_vs_diffusers"] = base["ms_per_clip"] / row["ms_per_clip"]
        log(f"[vae] {name:>20}: {vae_row_text(row)}")
        save(report, args, device)


def vae_row_text(row):
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')}"
    text = (
        f"{row['ms_per_clip']:8.1f} ms/clip, peak {row['peak_gib']:6.2f} GiB, warm-up {row['warmup_s']:6.2f} s "
        f"(peak {row['warmup_peak_gib']:6.2f} GiB)"
    )
    if "speedup_vs_diffusers" in row:
        text += f", x{row['speedup_vs_diffusers']:.2f}"
    if "rel_l2_vs_diffusers" in row:
        text += f", rel L2 {row['rel_l2_vs_diffusers']:.2e}, max abs {row['max_abs_vs_diffusers']:.2e}"
    return text


def best_variant(rows, fits=lambda row: True):
    """The fastest chunked variant that ran and `fits` (None when none does)."""
    done = [row for row in rows if row["status"] == "ok" and row.get("chunk_frames") and fits(row)]
    return min(done, key=lambda row: row["ms_per_clip"]) if done else None


def fits_end_to_end(device, batch_size, vae_batch):
    """Whether a variant's activations for an e2e batch, beside the models already on the GPU, stay under 90 % of
    its memory (by the vae case's measurement)."""
    if device.type != "cuda":
        return lambda row: True
    free = (
        0.9 * torch.cuda.get_device_properties(device).total_memory / 2**30
        - torch.cuda.memory_allocated(device) / 2**30
    )
    return lambda row: row.get("activation_gib") is None or row["activation_gib"] * batch_size / vae_batch < free


# -- case e2e: encode_dataset, old path against the new default ------------------------------------------------
def e2e_case(autoencoder, text, names, folder, clips, args, device, report):
    configs = [
        ("baseline", "diffusers", False),
        ("default", default_variant(device), True),
    ]
    # The fastest variant whose activations at --batch-size fit beside umT5 (c80 at batch 2 may not).
    best = best_variant(report["vae_variants"], fits_end_to_end(device, args.batch_size, args.vae_batch))
    if best is not None and best["variant"] != configs[-1][1]:
        configs.append(("fastest VAE variant", best["variant"], True))
    log(f"[e2e] {args.clips} clips, batch size {args.batch_size}: " + ", ".join(c[0] for c in configs))
    for label, variant, prefetch in configs:
        row = {"config": label, "vae": variant, "prefetch": prefetch, "clips": args.clips, "status": "ok"}
        release_memory(device)
        try:
            model = copy.deepcopy(autoencoder) if parse_variant(variant)["channels_last"] else autoencoder
            encoders = Encoders(VideoVAE(model, device, **parse_variant(variant)), text, names)
            # Untimed: a first batch of the shard's shape (cuDNN autotuning, compilation, allocator warm-up).
            encoders(clips[: args.batch_size], [CAPTION] * args.batch_size)
            out = os.path.join(args.workdir, f"latents_{label.replace(' ', '_')}")
            shutil.rmtree(out, ignore_errors=True)
            reset_peak(device)
            tick = time.perf_counter()
            result = encode_dataset(
                folder,
                out,
                batch_size=args.batch_size,
                progress=False,
                encoders=encoders,
                device=device.type,
                precision=args.precision,
                prefetch=prefetch,
            )
            elapsed = time.perf_counter() - tick
            row["seconds"], row["clips_per_s"] = round(elapsed, 2), result["samples"] / elapsed
            row["peak_gib"] = peak_gib(device)
        except Exception as exc:
            row["status"], row["error"] = "failed", short_error(exc)
            if args.verbose:
                traceback.print_exc()
        finally:
            encoders = model = None
        report["end_to_end"].append(row)
        rows = {r["config"]: r for r in report["end_to_end"] if r["status"] == "ok"}
        if "baseline" in rows and row["status"] == "ok":
            row["speedup_vs_baseline"] = row["clips_per_s"] / rows["baseline"]["clips_per_s"]
            written, expected = shard_latents(out), shard_latents(os.path.join(args.workdir, "latents_baseline"))
            row["rel_l2_vs_baseline"] = float(np.linalg.norm(written - expected) / np.linalg.norm(expected))
        line = (
            f"{row['clips_per_s']:.3f} clips/s, {row['seconds']} s, peak {row['peak_gib']:.2f} GiB"
            + (f", x{row['speedup_vs_baseline']:.2f}" if "speedup_vs_baseline" in row else "")
            + (f", latents rel L2 {row['rel_l2_vs_baseline']:.2e} vs baseline" if "rel_l2_vs_baseline" in row else "")
            if row["status"] == "ok"
            else f"failed: {row['error']}"
        )
        log(f"[e2e] {label:>20} ({variant}, prefetch {'on' if prefetch else 'off'}): {line}")
        save(report, args, device)
    release_memory(device)


def shard_latents(folder):
    """Every latent an encode wrote into `folder`, in key order, as one float32 array."""
    import io

    latents = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            for raw in iter_raw_samples(os.path.join(folder, name)):
                latents[raw["__key__"]] = np.load(io.BytesIO(raw["latent.npy"])).astype(np.float32)
    return np.stack([latents[key] for key in sorted(latents)])


# -- case batch: per batch size (the table of docs/performance.md) ---------------------------------------------
def batch_row(encoders, folder, batch_size, clip_bytes, args, device):
    frames = decode_clip(clip_bytes)
    video = torch.stack([to_model_input(frames)] * batch_size)
    captions = ["a slow drift of colour bands across the frame, filmed in soft daylight"] * batch_size
    row = {"batch_size": batch_size, "frames": args.frames, "height": args.height, "width": args.width}
    reset_peak(device)
    row["decode_ms_per_clip"] = timed(lambda: decode_clip(clip_bytes), args.warmup, args.repeat, torch.device("cpu"))
    reset_peak(device)
    row["vae_ms"] = timed(lambda: encoders.vae.encode(video), args.warmup, args.repeat, device)
    row["vae_peak_gib"] = peak_gib(device)
    reset_peak(device)
    row["text_ms"] = timed(lambda: encoders.text.encode(captions), args.warmup, args.repeat, device)
    row["text_peak_gib"] = peak_gib(device)
    out = os.path.join(args.workdir, f"latents_b{batch_size}")
    shutil.rmtree(out, ignore_errors=True)
    reset_peak(device)
    tick = time.perf_counter()
    report = encode_dataset(
        folder,
        out,
        batch_size=batch_size,
        progress=False,
        encoders=encoders,
        device=device.type,
        precision=args.precision,
    )
    elapsed = time.perf_counter() - tick
    row["end_to_end_s"] = round(elapsed, 2)
    row["end_to_end_peak_gib"] = peak_gib(device)
    row["clips_per_s"] = report["samples"] / elapsed
    row["vae_clips_per_s"] = batch_size / row["vae_ms"] * 1e3
    return row


def default_variant(device) -> str:
    """The VAE variant `osp-data encode` runs by default on this device."""
    return GPU_DEFAULT_VARIANT if device.type == "cuda" else f"c{DEFAULT_CHUNK_FRAMES}"


def batch_case(autoencoder, text, names, folder, clip_bytes, args, device, report):
    options = parse_variant(default_variant(device))  # what osp-data encode runs here
    model = copy.deepcopy(autoencoder) if options["channels_last"] else autoencoder
    encoders = Encoders(VideoVAE(model, device, **options), text, names)
    for size in args.batch_sizes.split(","):
        release_memory(device)
        report["rows"].append(batch_row(encoders, folder, int(size), clip_bytes, args, device))
        save(report, args, device)
    log(
        f"{'batch':>5} {'decode ms/clip':>14} {'VAE ms':>9} {'VAE GiB':>8} {'text ms':>8} {'text GiB':>8} "
        f"{'e2e clips/s':>11} {'e2e GiB':>8}"
    )
    for row in report["rows"]:
        log(
            f"{row['batch_size']:>5} {row['decode_ms_per_clip']:>14.1f} {row['vae_ms']:>9.1f} "
            f"{row['vae_peak_gib']:>8.2f} {row['text_ms']:>8.1f} {row['text_peak_gib']:>8.2f} "
            f"{row['clips_per_s']:>11.3f} {row['end_to_end_peak_gib']:>8.2f}"
        )


# -- report ------------------------------------------------------------------------------------------------------
def summary(report):
    """The ratios the comparison is about, from the rows measured so far."""
    rows = {row["variant"]: row for row in report["vae_variants"] if row["status"] == "ok"}
    ratios = {}
    default = f"c{DEFAULT_CHUNK_FRAMES}"
    if "diffusers" in rows and default in rows:
        ratios["vae_default_vs_diffusers"] = rows["diffusers"]["ms_per_clip"] / rows[default]["ms_per_clip"]
    best = best_variant(report["vae_variants"])
    if "diffusers" in rows and best is not None:
        ratios["vae_fastest_variant"] = best["variant"]
        ratios["vae_fastest_vs_diffusers"] = rows["diffusers"]["ms_per_clip"] / best["ms_per_clip"]
    if "high-precision" in rows:  # the scale the chunked variants' differences compare with
        ratios["rounding_rel_l2_of_diffusers"] = rows["high-precision"].get("rel_l2_vs_diffusers")
    chunked = [
        row["rel_l2_vs_diffusers"] for row in rows.values() if row["chunk_frames"] and "rel_l2_vs_diffusers" in row
    ]
    if chunked:
        ratios["largest_rel_l2_of_chunked_variants"] = max(chunked)
    e2e = {row["config"]: row for row in report["end_to_end"] if row["status"] == "ok"}
    for label in ("default", "fastest VAE variant"):
        if "baseline" in e2e and label in e2e:
            key = "end_to_end_" + label.replace(" ", "_") + "_vs_baseline"
            ratios[key] = e2e[label]["clips_per_s"] / e2e["baseline"]["clips_per_s"]
    return ratios


def save(report, args, device):
    """Rewrite the JSON (through a temporary file, so a kill never leaves half of it)."""
    report["ratios"] = summary(report)
    tmp = args.out + ".tmp"
    write_report(tmp, report["rows"], device, **{k: v for k, v in report.items() if k != "rows"})
    os.replace(tmp, args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models and 64x96 x 9-frame clips on CPU, all cases")
    parser.add_argument(
        "--cases", default=None, help="comma-separated: vae, e2e, batch (default vae,e2e; with --tiny all three)"
    )
    parser.add_argument("--variants", default=None, help=f"VAE variants of the vae case (default {DEFAULT_VARIANTS})")
    parser.add_argument("--vae-clips", type=int, default=4, help="clips each VAE variant encodes (default 4)")
    parser.add_argument("--vae-batch", type=int, default=1, help="clips per VAE call in the vae case (default 1)")
    parser.add_argument(
        "--vae-budget-s",
        type=float,
        default=150.0,
        help="start no further VAE variant after this many seconds of the vae case; e2e still runs (default 150)",
    )
    parser.add_argument(
        "--max-warmup-s",
        type=float,
        default=90.0,
        help="a variant whose warm-up call takes longer is recorded as failed, untimed (default 90)",
    )
    parser.add_argument("--batch-sizes", default="1,2,4", help="clips per VAE call in the batch case (default 1,2,4)")
    parser.add_argument("--batch-size", type=int, default=2, help="clips per VAE call in the e2e case (default 2)")
    parser.add_argument("--clips", type=int, default=8, help="clips in the end-to-end shard (default 8)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--text-layers", type=int, default=24, help="umT5 encoder layers (default 24, XXL)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per phase of the batch case (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per phase, batch case (default 3)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of every failed variant")
    parser.add_argument("--out", default="data_encode.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.frames, args.height, args.width, args.clips, args.precision = 9, 64, 96, 4, "fp32"
        args.warmup, args.repeat, args.batch_sizes, args.vae_clips = 0, 1, "1,2", 2
        args.cases, args.variants = args.cases or "vae,e2e,batch", args.variants or TINY_VARIANTS
    args.cases, args.variants = args.cases or "vae,e2e", args.variants or DEFAULT_VARIANTS
    cases = set(args.cases.split(","))
    if cases - {"vae", "e2e", "batch"}:
        raise SystemExit(f"--cases: unknown case(s) {', '.join(sorted(cases - {'vae', 'e2e', 'batch'}))}")
    if args.vae_batch < 1 or args.vae_clips < args.vae_batch or args.clips < args.batch_size or args.batch_size < 1:
        raise SystemExit("need 1 <= --vae-batch <= --vae-clips and 1 <= --batch-size <= --clips")
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    scratch = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_encode_")
    names = (
        {"vae": "tiny", "text_encoder": "tiny"}
        if args.tiny
        else {"vae": "AutoencoderKLWan() random", "text_encoder": f"umT5-XXL shape, {args.text_layers} layers, random"}
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("dtype", "workdir", "out")}
    report = {"models": names, "settings": settings, "vae_variants": [], "end_to_end": [], "rows": []}
    report["cudnn"] = torch.backends.cudnn.version() if device.type == "cuda" else None
    started = time.perf_counter()
    where = f"{torch.cuda.get_device_name(device)}, cuDNN {report['cudnn']}" if device.type == "cuda" else "cpu"
    log(f"osp-data encode benchmark: {args.height}x{args.width} x {args.frames} frames, {args.precision}, {where}")
    try:
        folder = os.path.join(args.workdir, "clips")
        count = max(args.vae_clips if "vae" in cases else 0, args.clips if cases - {"vae"} else 0, args.batch_size)
        shard = write_clip_folder(folder, count, args.frames, args.height, args.width, 16.0)
        samples = list(iter_raw_samples(shard))
        clips = [decode_clip(raw["mp4"]) for raw in samples[: max(args.vae_clips, args.batch_size)]]
        log(f"wrote {len(samples)} clips ({time.perf_counter() - started:.0f} s)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if args.tiny:
                autoencoder = tiny_wan_vae().to(device)
            else:
                autoencoder = full_size_autoencoder(device, args.dtype)
        if "vae" in cases:
            vae_case(autoencoder, clips[: args.vae_clips], args, device, report)
        text = None
        if cases & {"e2e", "batch"}:
            text = (
                tiny_text_encoder(device) if args.tiny else full_size_text_encoder(device, args.dtype, args.text_layers)
            )
        if "e2e" in cases:
            if args.clips != len(samples):  # the e2e shard holds exactly --clips clips
                folder = os.path.join(args.workdir, "clips_e2e")
                write_clip_folder(folder, args.clips, args.frames, args.height, args.width, 16.0)
            e2e_case(autoencoder, text, names, folder, clips, args, device, report)
        if "batch" in cases:
            batch_case(autoencoder, text, names, folder, samples[0]["mp4"], args, device, report)
    finally:
        save(report, args, device)
        if scratch:
            shutil.rmtree(args.workdir, ignore_errors=True)
    log(f"ratios: {report['ratios']}")
    log(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
