"""`osp-data encode` throughput on one GPU with the full-size Wan2.1 VAE and a umT5-XXL-shaped text encoder.

Random weights (speed does not depend on them). Writes a shard of 480P / 81-frame clips, then for each batch
size: VAE and text-encoder times per batch, and the end-to-end `encode_dataset` clips/s (MP4 decode, both
models, writing), each with the peak GPU memory. Prints a table and writes JSON. --tiny runs in seconds on CPU.

    python benchmarks/bench_data_encode.py --out data_encode.json
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import timed, write_report  # noqa: E402

from osp_data.build import CLIPS_FORMAT  # noqa: E402
from osp_data.encode import Encoders, encode_dataset  # noqa: E402
from osp_megatron.data.buckets import Bucket  # noqa: E402
from osp_megatron.data.shards import ShardInfo, write_index  # noqa: E402
from osp_megatron.data.video import decode_clip, encode_clip, to_model_input  # noqa: E402
from osp_megatron.models.text_encoder import ByteTokenizer, TextEncoder, tiny_umt5_config  # noqa: E402
from osp_megatron.models.vae import VideoVAE, tiny_wan_vae  # noqa: E402

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


def full_size_encoders(device, dtype, text_layers):
    """AutoencoderKLWan's default (Wan2.1) config and umT5-XXL's shape, random weights, made on the device."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device(device):
        vae = AutoencoderKLWan().to(dtype)
    with torch.device("meta"):
        text_model = UMT5EncoderModel(UMT5Config(**dict(UMT5_XXL, num_layers=text_layers)))
    text_model = text_model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in text_model.named_parameters():
            param.fill_(1.0) if "layer_norm" in name else param.normal_(0.0, 0.02, generator=generator)
    text = TextEncoder(text_model.to(dtype), ByteTokenizer(), 512, device)
    return Encoders(
        VideoVAE(vae, device),
        text,
        {"vae": "AutoencoderKLWan() random", "text_encoder": f"umT5-XXL shape, {text_layers} layers, random"},
    )


def tiny_encoders(device):
    from transformers import UMT5EncoderModel

    text = TextEncoder(UMT5EncoderModel(tiny_umt5_config(32)), ByteTokenizer(), 32, device)
    return Encoders(VideoVAE(tiny_wan_vae(), device), text, {"vae": "tiny", "text_encoder": "tiny"})


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
    caption = "a slow drift of colour bands across the frame, filmed in soft daylight with a gentle camera pan"
    with webdataset.TarWriter(path) as writer:
        for i in range(clips):
            writer.write(
                {
                    "__key__": f"clip{i:05d}",
                    "mp4": encode_clip(moving_clip(frames, height, width, i), fps),
                    "txt": caption.encode(),
                    "json": json.dumps({"caption": caption}).encode(),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models and 64x96 x 9-frame clips on CPU")
    parser.add_argument("--batch-sizes", default="1,2,4", help="clips per VAE call (default 1,2,4)")
    parser.add_argument("--clips", type=int, default=8, help="clips in the end-to-end shard (default 8)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--text-layers", type=int, default=24, help="umT5 encoder layers (default 24, XXL)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per phase (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per phase (default 3)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default="data_encode.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.frames, args.height, args.width, args.clips, args.precision = 9, 64, 96, 2, "fp32"
        args.warmup, args.repeat, args.batch_sizes = 0, 1, "1,2"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    scratch = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_encode_")
    try:
        folder = os.path.join(args.workdir, "clips")
        shard = write_clip_folder(folder, args.clips, args.frames, args.height, args.width, 16.0)
        from osp_megatron.data.shards import iter_raw_samples

        clip_bytes = next(iter_raw_samples(shard))["mp4"]
        encoders = tiny_encoders(device) if args.tiny else full_size_encoders(device, dtype, args.text_layers)
        rows = [batch_row(encoders, folder, int(b), clip_bytes, args, device) for b in args.batch_sizes.split(",")]
    finally:
        if scratch:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"osp-data encode, {args.height}x{args.width} x {args.frames} frames, {args.precision}, {device}")
    print(
        f"{'batch':>5} {'decode ms/clip':>14} {'VAE ms':>9} {'VAE GiB':>8} {'text ms':>8} {'text GiB':>8} "
        f"{'e2e clips/s':>11} {'e2e GiB':>8}"
    )
    for row in rows:
        print(
            f"{row['batch_size']:>5} {row['decode_ms_per_clip']:>14.1f} {row['vae_ms']:>9.1f} "
            f"{row['vae_peak_gib']:>8.2f} {row['text_ms']:>8.1f} {row['text_peak_gib']:>8.2f} "
            f"{row['clips_per_s']:>11.3f} {row['end_to_end_peak_gib']:>8.2f}"
        )
    write_report(args.out, rows, device, models=encoders.names)


if __name__ == "__main__":
    main()
