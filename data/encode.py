"""`osp-data encode`: clip shards -> Wan VAE latents and umT5 text states, the shards `osp-train` reads.

Each rank encodes its share of shards (torchrun), batched per bucket; finished shards are skipped on a rerun.
A background thread reads, decodes and text-encodes the next batch while the VAE encodes this one (docs/data.md).
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import webdataset
from tqdm import tqdm

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.shards import (
    INDEX_NAME,
    ShardInfo,
    atomic_write_bytes,
    iter_raw_samples,
    npy_bytes,
    read_index,
    sample_offsets,
    write_index,
)
from osp_megatron.data.video import VideoError, decode_clip, to_model_input
from osp_megatron.models.text_encoder import TextEncoder, build_text_encoder
from osp_megatron.models.vae import DEFAULT_CHUNK_FRAMES, VideoVAE, build_vae, check_chunk_frames

from .build import CLIPS_FORMAT
from .outputs import claim_output
from .prefetch import Prefetcher
from .problems import ProblemLog

LATENTS_FORMAT = "osp-latents-v1"
STATE_DIR = ".encode"  # per-shard records (sample offsets, problems) of finished shards
REPORT_NAME = "encode_report.json"


class Encoders:
    """The frozen VAE and text encoder of one rank: clips and captions in, latents and text states out.

    Work is split in two steps so that they can overlap: `prepare` (model inputs on the CPU and the text encoder,
    on its own CUDA stream) and `encode_video` (the VAE).
    """

    def __init__(self, vae: VideoVAE, text: TextEncoder, names: dict[str, str]):
        self.vae, self.text, self.names = vae, text, names
        self._text_stream = None

    @classmethod
    def load(
        cls,
        vae_path: str | None,
        text_encoder_path: str | None,
        text_dim: int,
        text_len: int,
        device: torch.device,
        dtype: torch.dtype,
        vae_chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
        vae_channels_last: bool | None = None,
        vae_compile: bool = False,
        vae_fuse: bool | None = None,
    ) -> "Encoders":
        """From local model folders; tiny random-weight models (with a warning) for those not given. The vae_*
        options set how the VAE encodes (models/vae.py, VideoVAE)."""
        if vae_path is None or text_encoder_path is None:
            missing = [
                name for name, path in (("--vae", vae_path), ("--text-encoder", text_encoder_path)) if path is None
            ]
            warnings.warn(
                f"no {' / '.join(missing)} given: using tiny random-weight models (for "
                "tests only; the latents and text states mean nothing to a real DiT)"
            )
        vae = build_vae(
            vae_path,
            device=device,
            dtype=dtype,
            chunk_frames=vae_chunk_frames,
            # None: on GPUs, where it was measured faster; an explicit True or False is followed anywhere
            channels_last=device.type == "cuda" if vae_channels_last is None else vae_channels_last,
            compile_encoder=vae_compile,
            fuse_elementwise=device.type == "cuda" if vae_fuse is None else vae_fuse,
        )
        text = build_text_encoder(text_encoder_path, text_dim, text_len, device=device, dtype=dtype)
        if dtype != torch.float32:  # the tiny models are built in float32
            vae.autoencoder.to(dtype)
            text.model.to(dtype)
        return cls(vae, text, {"vae": vae_path or "tiny-random", "text_encoder": text_encoder_path or "tiny-random"})

    def __call__(self, clips: list[np.ndarray], captions: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """uint8 clips [B, F, H, W, 3] and B captions -> (latents [B, C, T, h, w], [(states [l, D]), ...])."""
        return self.encode_video(self.prepare(clips, captions))

    def prepare(self, clips: list[np.ndarray], captions: list[str]) -> "PreparedBatch":
        """The VAE's input (on the CPU, in the VAE's dtype) and the text states of one batch; safe to run in a
        thread beside `encode_video`."""
        video = torch.stack([to_model_input(frames) for frames in clips]).to(self.vae.dtype)
        if self.text.device.type != "cuda":
            states, lengths = self.text.encode(captions)
            return PreparedBatch(video, _unpadded(states, lengths), None)
        device = self.text.device
        with torch.cuda.device(device):  # a thread's current device is the first GPU until set
            if self._text_stream is None:
                self._text_stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._text_stream):
                states, lengths = self.text.encode(captions)
                done = torch.cuda.Event()
                done.record(self._text_stream)
        return PreparedBatch(video, _unpadded(states, lengths), done)

    def encode_video(self, batch: "PreparedBatch") -> tuple[np.ndarray, list[np.ndarray]]:
        """(latents [B, C, T, h, w], text states) of a prepared batch: runs the VAE."""
        latents = self.vae.encode(batch.video)
        if batch.text_done is not None:  # the text encoder's stream has finished this batch's work
            batch.text_done.synchronize()
        return latents.numpy(), batch.text_states


@dataclasses.dataclass
class PreparedBatch:
    """One batch ready for the VAE: video [B, 3, F, H, W] on the CPU, unpadded text states, and the CUDA event
    the text encoder's stream records when it is done (None on the CPU)."""

    video: torch.Tensor
    text_states: list[np.ndarray]
    text_done: torch.cuda.Event | None


def _unpadded(states, lengths):
    return [states[i, : int(lengths[i])].numpy() for i in range(len(lengths))]


def _read_batches(in_path: str, expected: tuple[int, int, int, int], batch_size: int) -> Iterator[tuple]:
    """The clips of one shard in file order: ("batch", [(key, frames, caption, metadata), ...]) of batch_size
    (the last one shorter) and ("problem", (kind, item, message)) where a clip or the shard is bad, in the order
    they are met."""
    batch = []
    try:
        for raw in iter_raw_samples(in_path):
            item = f"{os.path.basename(in_path)}/{raw['__key__']}"
            try:
                if "mp4" not in raw:
                    raise VideoError("has no 'mp4' entry")
                frames = decode_clip(raw["mp4"])
                if tuple(frames.shape) != expected:
                    raise VideoError(f"has shape {tuple(frames.shape)}, its shard's bucket is {expected}")
                metadata = json.loads(raw.get("json", b"{}"))
            except (VideoError, ValueError) as exc:
                yield ("problem", ("bad clip", item, str(exc)))
                continue
            caption = raw.get("txt", b"").decode("utf-8", errors="replace")
            batch.append((raw["__key__"], frames, caption, metadata))
            if len(batch) == batch_size:
                yield ("batch", batch)
                batch = []
    except ConfigError as exc:
        yield ("problem", ("unreadable shard", in_path, f"{exc}; the clips read before the damage are kept"))
    if batch:
        yield ("batch", batch)


def _prepared(items: Iterator[tuple], encoders: Encoders) -> Iterator[tuple]:
    """`items` with each batch's model inputs made: ("batch", (batch, PreparedBatch)); problems pass through."""
    for kind, value in items:
        if kind == "batch":
            value = (value, encoders.prepare([b[1] for b in value], [b[2] for b in value]))
        yield kind, value


def encode_shard(
    in_path: str,
    out_path: str,
    expected: tuple[int, int, int, int],
    encoders: Encoders,
    batch_size: int,
    latent_dtype: str,
    problems: ProblemLog,
    prefetch: bool = True,
) -> dict:
    """Encode one clip shard into `out_path` (atomically); returns its record (samples, offsets, problems).

    prefetch: read, decode and text-encode the next batch in a background thread while the VAE encodes this one
    (the same shard either way).
    """
    tmp = os.path.join(os.path.dirname(out_path), f".{os.path.basename(out_path)}.tmp")
    start = len(problems.records)
    count, latent_shape = 0, None
    items = _prepared(_read_batches(in_path, expected, batch_size), encoders)
    with open(tmp, "wb") as handle, webdataset.TarWriter(handle) as writer:
        with Prefetcher(items) if prefetch else contextlib.closing(items) as ready:
            for kind, value in ready:
                if kind == "problem":
                    problems.report(*value)
                    continue
                batch, prepared = value
                latents, texts = encoders.encode_video(prepared)
                for (key, _, caption, metadata), latent, text in zip(batch, latents, texts):
                    latent_shape = list(latent.shape)
                    metadata = dict(metadata, latent_shape=latent_shape, text_length=int(text.shape[0]))
                    writer.write(
                        {
                            "__key__": key,
                            "latent.npy": npy_bytes(latent, latent_dtype),
                            "text.npy": npy_bytes(text, latent_dtype),
                            "txt": caption.encode("utf-8"),
                            "json": json.dumps(metadata).encode("utf-8"),
                        }
                    )
                count += len(batch)
    record = {
        "name": os.path.basename(out_path),
        "num_samples": count,
        "latent_shape": latent_shape,
        "offsets": list(sample_offsets(tmp)) if count else None,
        "problems": problems.records[start:],
    }
    record_path = os.path.join(os.path.dirname(out_path), STATE_DIR, os.path.basename(out_path) + ".json")
    atomic_write_bytes(record_path, json.dumps(record).encode())
    if count:
        os.replace(tmp, out_path)
    else:  # every clip was bad: no empty shard is written
        os.remove(tmp)
    return record


def _init_distributed(device):
    """(rank, world size) from torchrun's environment, joining the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def encode_dataset(
    input_dir: str,
    output: str,
    vae_path: str | None = None,
    text_encoder_path: str | None = None,
    text_dim: int = 4096,
    text_len: int = 512,
    batch_size: int = 2,
    latent_dtype: str = "float16",
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    encoders: Encoders | None = None,
    vae_chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
    vae_channels_last: bool | None = None,
    vae_compile: bool = False,
    vae_fuse: bool | None = None,
    prefetch: bool = True,
) -> dict | None:
    """Encode (or resume encoding) every clip shard of `input_dir`; rank 0 writes the index and the report.

    encoders: ready Encoders (benchmarks pass random-weight full-size models); default: loaded from the paths
    with the vae_* options (VideoVAE's chunk_frames, channels_last, compile_encoder, fuse_elementwise; they change
    the speed, not
    the latents, so a resumed encode may use others). prefetch: overlap reading, MP4 decoding and the text
    encoder with the VAE (encode_shard). Returns rank 0's report (None on the other ranks).
    """
    check_chunk_frames(vae_chunk_frames, setting="--vae-chunk-frames")
    index = read_index(input_dir)
    if index is None or index.get("format") != CLIPS_FORMAT:
        raise ConfigError(
            f"--input {input_dir}: holds no `osp-data build` output ({INDEX_NAME} of format {CLIPS_FORMAT!r})"
        )
    device = _pick_device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    rank, world = _init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    options = {
        "format": LATENTS_FORMAT,
        "input": os.path.abspath(input_dir),
        "vae": vae_path,
        "text_encoder": text_encoder_path,
        "text_dim": text_dim,
        "text_len": text_len,
        "latent_dtype": latent_dtype,
        "precision": precision,
    }
    state_dir = os.path.join(output, STATE_DIR)
    if rank == 0:
        _prepare_output(output, state_dir, options)
    if world > 1:
        dist.barrier()
    if encoders is None:
        encoders = Encoders.load(
            vae_path,
            text_encoder_path,
            text_dim,
            text_len,
            device,
            dtype,
            vae_chunk_frames=vae_chunk_frames,
            vae_channels_last=vae_channels_last,
            vae_compile=vae_compile,
            vae_fuse=vae_fuse,
        )
    problems = ProblemLog("encode")
    entries = index["shards"]
    mine = entries[rank::world]
    started, clips = time.time(), 0
    bar = tqdm(
        total=len(mine), unit="shard", disable=not progress or rank != 0, desc="osp-data encode", dynamic_ncols=True
    )
    for entry in mine:
        out_path = os.path.join(output, entry["name"])
        record_path = os.path.join(state_dir, entry["name"] + ".json")
        if not _finished(record_path, out_path):
            frames = index["frames"]
            height, width = (int(s) for s in entry["bucket"].split("x"))
            record = encode_shard(
                os.path.join(input_dir, entry["name"]),
                out_path,
                (frames, height, width, 3),
                encoders,
                batch_size,
                latent_dtype,
                problems,
                prefetch,
            )
            clips += record["num_samples"]
        bar.update(1)
        elapsed = max(time.time() - started, 1e-9)
        bar.set_postfix(clips=clips, clips_per_s=f"{clips * world / elapsed:.2f}", bad=len(problems.records))
    bar.close()
    elapsed = time.time() - started
    totals = torch.tensor([clips, elapsed], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.barrier()
    report = None
    if rank == 0:
        report = _write_index_and_report(
            input_dir, output, index, options, encoders.names, int(totals[0]), float(totals[1]) / world
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return report


def _finished(record_path, out_path):
    """A shard is done when its record exists and, unless every clip was bad, its renamed output too."""
    if not os.path.isfile(record_path):
        return False
    with open(record_path, encoding="utf-8") as handle:
        return json.load(handle)["num_samples"] == 0 or os.path.isfile(out_path)


def _prepare_output(output, state_dir, options):
    claim_output(output, os.path.join(state_dir, "options.json"), LATENTS_FORMAT, options)
    for name in os.listdir(output):  # files of a killed run: never readable, now removed
        if name.endswith(".tmp"):
            os.remove(os.path.join(output, name))


def _write_index_and_report(input_dir, output, index, options, names, clips, seconds):
    problems = ProblemLog("encode")
    infos = []
    for entry in index["shards"]:
        with open(os.path.join(output, STATE_DIR, entry["name"] + ".json"), encoding="utf-8") as handle:
            record = json.load(handle)
        problems.extend(record["problems"])
        if record["num_samples"]:
            infos.append(
                ShardInfo(
                    os.path.join(output, entry["name"]),
                    record["num_samples"],
                    entry["bucket"],
                    tuple(record["latent_shape"]),
                    tuple(record["offsets"]),
                )
            )
    per_bucket = {}
    for info in infos:
        per_bucket[info.bucket] = per_bucket.get(info.bucket, 0) + info.num_samples
    report = {
        "format": LATENTS_FORMAT,
        "samples": sum(per_bucket.values()),
        "shards": len(infos),
        "samples_per_bucket": dict(sorted(per_bucket.items())),
        "clips_this_run": clips,
        "seconds_this_run": round(seconds, 2),
        "clips_per_s": round(clips / max(seconds, 1e-9), 3),
        "problems": problems.as_dict(),
    }
    atomic_write_bytes(os.path.join(output, REPORT_NAME), json.dumps(report, indent=1).encode())
    if not infos:  # no index: the loader sees no data set here
        print(
            f"osp-data encode: failed: no sample encoded under {output}; {problems.summary()} (listed in "
            f"{REPORT_NAME}); no {INDEX_NAME} written",
            file=sys.stderr,
        )
        return report
    write_index(
        output,
        infos,
        format=LATENTS_FORMAT,
        fps=index["fps"],
        frames=index["frames"],
        text_dim=options["text_dim"],
        text_len=options["text_len"],
        latent_dtype=options["latent_dtype"],
        vae=names["vae"],
        text_encoder=names["text_encoder"],
        samples_per_bucket=dict(sorted(per_bucket.items())),
    )
    print(
        f"osp-data encode: {report['samples']} samples in {len(infos)} shards under {output} ({clips} clips this "
        f"run, {report['clips_per_s']} clips/s); {problems.summary()}"
    )
    return report
