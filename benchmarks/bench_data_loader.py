"""The training loader (`osp-data bench`) on 480P latent shards: samples/s and MB/s per worker count.

Writes random float16 latents [16, 21, 60, 104] and umT5-sized text states [120, 4096] (5.2 MB a sample) in
shards with an index, then reads them with WebDatasetLoader as osp-train does. Prints a table, writes JSON with
the peak resident memory of the process and its workers beside each rate, and the loading process's CPU time
per sample (the whole cost with 0 workers; independent of other load on the machine). --tiny runs in seconds.

    python benchmarks/bench_data_loader.py --out data_loader.json
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile

import numpy as np
import torch
import webdataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_report  # noqa: E402

from osp_data.bench import bench_loader  # noqa: E402
from osp_megatron.data.config import DataConfig  # noqa: E402
from osp_megatron.data.shards import ShardInfo, npy_bytes, sample_offsets, write_index  # noqa: E402


def write_latent_folder(folder, samples, per_shard, latent_shape, text_shape):
    """Random float16 latent shards with a full index (bucket, shape, per-sample byte offsets)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for first in range(0, samples, per_shard):
        path = os.path.join(folder, f"bench-{first // per_shard:06d}.tar")
        with webdataset.TarWriter(path) as writer:
            for i in range(first, min(samples, first + per_shard)):
                writer.write(
                    {
                        "__key__": f"s{i:06d}",
                        "latent.npy": npy_bytes(rng.standard_normal(latent_shape, np.float32), np.float16),
                        "text.npy": npy_bytes(rng.standard_normal(text_shape, np.float32), np.float16),
                        "txt": b"a caption",
                    }
                )
        offsets = sample_offsets(path)
        shards.append(ShardInfo(path, len(offsets) - 1, "480x832", latent_shape, offsets))
    write_index(folder, shards, format="osp-latents-v1", text_dim=text_shape[1], text_len=512)


def peak_rss_gib():
    """Peak resident memory of this process and of its finished children (loader workers), GiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small latents, few samples")
    parser.add_argument("--samples", type=int, default=96, help="samples written (default 96, ~500 MB)")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts (default 0,1,2)")
    parser.add_argument("--micro-batch-sizes", default="1,2", help="micro-batch sizes (default 1,2)")
    parser.add_argument("--batches", type=int, default=40, help="timed micro-batches per row (default 40)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default="data_loader.json")
    args = parser.parse_args()
    latent_shape, text_shape = (16, 21, 60, 104), (120, 4096)
    if args.tiny:
        latent_shape, text_shape, args.samples, args.batches = (16, 3, 8, 12), (12, 64), 24, 6
        args.workers, args.micro_batch_sizes = "0,1", "1"
    scratch = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_loader_")
    rows = []
    try:
        folder = os.path.join(args.workdir, "latents")
        write_latent_folder(folder, args.samples, 16, latent_shape, text_shape)
        for workers in (int(w) for w in args.workers.split(",")):
            for micro in (int(m) for m in args.micro_batch_sizes.split(",")):
                config = DataConfig(path=folder, text_dim=text_shape[1], text_len=512, num_workers=workers)
                row = bench_loader(config, micro, batches=args.batches)
                row["peak_rss_gib"] = round(peak_rss_gib(), 3)
                row["sample_mb"] = round(row["mb_per_s"] / row["samples_per_s"], 2)
                rows.append(row)
    finally:
        if scratch:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"training loader, latents {list(latent_shape)} + text {list(text_shape)} float16, {os.cpu_count()} CPUs")
    print(
        f"{'workers':>7} {'micro':>5} {'samples/s':>9} {'MB/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'CPU ms/sample':>13} {'RSS GiB':>8}"
    )
    for row in rows:
        print(
            f"{row['num_workers']:>7} {row['micro_batch_size']:>5} {row['samples_per_s']:>9.1f} "
            f"{row['mb_per_s']:>8.1f} {row['batch_ms_p50']:>8.1f} {row['batch_ms_p95']:>8.1f} "
            f"{row['cpu_ms_per_sample']:>13.1f} {row['peak_rss_gib']:>8.2f}"
        )
    write_report(args.out, rows, torch.device("cpu"), cpus=os.cpu_count())


if __name__ == "__main__":
    main()
