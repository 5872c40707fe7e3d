"""`osp-data build`: videos + captions -> bucketed clips (MP4 at the target fps and frame count) in tar shards.

Worker processes decode; the parent writes one growing shard per bucket and journals finished shards to resume.
"""

import hashlib
import json
import multiprocessing
import os
import sys
import time

import webdataset
from tqdm import tqdm

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.buckets import parse_buckets
from osp_megatron.data.shards import INDEX_NAME, ShardInfo, atomic_write_bytes, write_index
from osp_megatron.data.video import VideoError, encode_clip, sample_clips

from .captions import CaptionEntry, list_videos, read_captions
from .outputs import claim_output
from .problems import ProblemLog

CLIPS_FORMAT = "osp-clips-v1"
JOURNAL_NAME = "build_journal.jsonl"
OPTIONS_NAME = "build_options.json"
REPORT_NAME = "build_report.json"


def check_frames(frames: int, temporal_stride: int = 4) -> None:
    if frames < 1 or (frames - 1) % temporal_stride:
        raise ConfigError(
            f"--frames must be 1 + a multiple of the VAE temporal stride {temporal_stride} "
            f"(e.g. 81 = 4 x 20 + 1), got {frames}"
        )


def process_video(
    job: tuple[CaptionEntry, str, dict],
) -> tuple[int, str | None, list[tuple[str, bytes, dict]], list[tuple[str, str]]]:
    """Worker: one caption entry -> (line, bucket name, [(key, mp4 bytes, metadata)], [(kind, message)])."""
    entry, video_path, options = job
    clips, problems = [], []
    bucket_name = None
    try:
        for number, (bucket, start, frames) in enumerate(
            sample_clips(
                video_path,
                options["fps"],
                options["frames"],
                parse_buckets(options["buckets"]),
                entry.start,
                entry.end,
                entry.fps,
                options["max_clips_per_video"],
            )
        ):
            bucket_name = bucket.name
            metadata = {
                "caption": entry.caption,
                "video": entry.path,
                "caption_line": entry.line,
                "clip": number,
                "start_s": round(start, 4),
                "fps": options["fps"],
                "frames": options["frames"],
                "height": bucket.height,
                "width": bucket.width,
                "bucket": bucket.name,
            }
            clips.append((f"v{entry.line:08d}_c{number:04d}", encode_clip(frames, options["fps"]), metadata))
    except VideoError as exc:
        problems.append((exc.kind, str(exc)))
    return entry.line, bucket_name, clips, problems


class _ShardWriter:
    """A bucket's shard being filled: a hidden temporary file renamed into place once complete."""

    def __init__(self, folder, name):
        self.folder, self.name = folder, name
        self.tmp = os.path.join(folder, f".{name}.tmp")
        self.handle = open(self.tmp, "wb")
        self.writer = webdataset.TarWriter(self.handle)
        self.num_samples, self.videos, self.problems = 0, [], []

    def add_video(self, line, clips, problems):
        for key, mp4, metadata in clips:
            self.writer.write(
                {
                    "__key__": key,
                    "mp4": mp4,
                    "txt": metadata["caption"].encode("utf-8"),
                    "json": json.dumps(metadata).encode("utf-8"),
                }
            )
        self.num_samples += len(clips)
        self.videos.append(line)
        self.problems.extend(problems)

    @property
    def size(self):
        return self.handle.tell()

    def abandon(self):
        self.writer.close()
        self.handle.close()
        os.remove(self.tmp)

    def finish(self):
        self.writer.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, os.path.join(self.folder, self.name))


def _read_journal(path):
    """Records of the journal; a torn last line (killed while appending) is ignored."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for text in handle:
                try:
                    records.append(json.loads(text))
                except ValueError:
                    break
    return records


def _append_journal(path, record):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_dataset(
    videos: str,
    captions: str,
    output: str,
    fps: float = 16.0,
    frames: int = 81,
    buckets: str = "480P",
    shard_size_mb: float = 512.0,
    workers: int = 0,
    max_clips_per_video: int = 0,
    progress: bool = True,
) -> dict:
    """Build (or resume building) the clip shards of `output`; returns the report dict (also in build_report.json)."""
    check_frames(frames)
    if fps <= 0:
        raise ConfigError(f"--fps must be positive, got {fps}")
    parse_buckets(buckets)
    if not os.path.isfile(captions):
        raise ConfigError(f"--captions {captions!r} does not exist")
    options = {
        "format": CLIPS_FORMAT,
        "fps": float(fps),
        "frames": frames,
        "buckets": buckets,
        "max_clips_per_video": max_clips_per_video,
        "videos": os.path.abspath(videos),
        "captions_sha256": _sha256(captions),
    }
    claim_output(output, os.path.join(output, OPTIONS_NAME), CLIPS_FORMAT, options)
    problems = ProblemLog("build")
    entries = read_captions(captions, problems)
    present = set(list_videos(videos))
    captioned = set()
    jobs = []
    for entry in entries:
        relative = os.path.relpath(entry.path, videos) if os.path.isabs(entry.path) else os.path.normpath(entry.path)
        captioned.add(relative)
        if relative not in present:
            problems.report(
                "absent video", f"{captions} line {entry.line}", f"names {entry.path!r}, which is not under {videos}"
            )
        elif not entry.caption:
            problems.report("missing caption", entry.path, f"{captions} line {entry.line} has an empty caption")
        else:
            jobs.append((entry, os.path.join(videos, relative), options))
    for relative in sorted(present - captioned):
        problems.report("missing caption", relative, f"no row of {captions} names this video")

    journal_path = os.path.join(output, JOURNAL_NAME)
    journal = _read_journal(journal_path)
    shards = [r for r in journal if "shard" in r]
    done = {line for r in shards for line in r["videos"]} | {r["bad"] for r in journal if "bad" in r}
    for record in journal:
        problems.extend(record.get("problems", []))
    known = {r["shard"] for r in shards}
    for name in os.listdir(output):  # shards written after the last journal line of a killed build
        if name.endswith(".tar") and name not in known or name.endswith(".tmp"):
            os.remove(os.path.join(output, name))
    counters = {}
    for record in shards:
        counters[record["bucket"]] = counters.get(record["bucket"], 0) + 1
    pending = [job for job in jobs if job[0].line not in done]
    paths = {job[0].line: job[0].path for job in pending}

    open_shards = {}
    clips_written, started = 0, time.time()

    def close_shard(bucket):
        shard = open_shards.pop(bucket)
        shard.finish()
        record = {
            "shard": shard.name,
            "bucket": bucket,
            "num_samples": shard.num_samples,
            "videos": shard.videos,
            "problems": shard.problems,
        }
        _append_journal(journal_path, record)
        shards.append(record)

    bar = tqdm(total=len(pending), unit="video", disable=not progress, desc="osp-data build", dynamic_ncols=True)
    # Workers come from a fork server, not from forking this process: a fork of a process whose other threads hold
    # locks (PyAV's decoder threads, a caller's threads) can hang the child in its first frame conversion.
    pool = multiprocessing.get_context("forkserver").Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(process_video, pending) if pool else map(process_video, pending)
        for line, bucket, clips, video_problems in results:
            records = [{"kind": kind, "item": paths[line], "message": message} for kind, message in video_problems]
            for record in records:
                problems.report(record["kind"], record["item"], record["message"])
            if not clips:
                _append_journal(journal_path, {"bad": line, "problems": records})
            else:
                if bucket not in open_shards:
                    name = f"{bucket}-{counters.get(bucket, 0):06d}.tar"
                    counters[bucket] = counters.get(bucket, 0) + 1
                    open_shards[bucket] = _ShardWriter(output, name)
                open_shards[bucket].add_video(line, clips, records)
                clips_written += len(clips)
                if open_shards[bucket].size >= shard_size_mb * 2**20:
                    close_shard(bucket)
            bar.update(1)
            elapsed = max(time.time() - started, 1e-9)
            bar.set_postfix(
                clips=clips_written, clips_per_s=f"{clips_written / elapsed:.2f}", bad=len(problems.records)
            )
        for bucket in sorted(open_shards):
            close_shard(bucket)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        for shard in open_shards.values():  # unfinished: never renamed into place, redone on resume
            shard.abandon()

    infos = [ShardInfo(os.path.join(output, r["shard"]), r["num_samples"], r["bucket"]) for r in shards]
    bucket_counts = {}
    for info in infos:
        bucket_counts[info.bucket] = bucket_counts.get(info.bucket, 0) + info.num_samples
    elapsed = time.time() - started
    report = {
        "format": CLIPS_FORMAT,
        "videos_captioned": len(entries),
        "videos_with_clips": len({line for r in shards for line in r["videos"]}),
        "clips": sum(bucket_counts.values()),
        "shards": len(infos),
        "clips_per_bucket": dict(sorted(bucket_counts.items())),
        "clips_this_run": clips_written,
        "seconds_this_run": round(elapsed, 2),
        "clips_per_s": round(clips_written / max(elapsed, 1e-9), 3),
        "problems": problems.as_dict(),
    }
    atomic_write_bytes(os.path.join(output, REPORT_NAME), json.dumps(report, indent=1).encode())
    if not report["clips"]:  # no index: `osp-data encode` and the loader see no data set here
        print(
            f"osp-data build: failed: no clip from the {len(entries)} captioned video(s) under {output}; "
            f"{problems.summary()} (listed in {REPORT_NAME}); no {INDEX_NAME} written",
            file=sys.stderr,
        )
        return report
    write_index(
        output,
        infos,
        format=CLIPS_FORMAT,
        fps=float(fps),
        frames=frames,
        buckets=buckets,
        clips_per_bucket=report["clips_per_bucket"],
    )
    print(
        f"osp-data build: {report['clips']} clips from {report['videos_with_clips']} videos in {len(infos)} shards "
        f"under {output} ({clips_written} clips this run, {report['clips_per_s']} clips/s); {problems.summary()}"
    )
    return report
