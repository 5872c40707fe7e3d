"""Render a list of video jobs on every rank of a job: skip finished ones, spread the rest over model replicas.

Rank 0 decides which videos are missing; batches of same-sized videos go round-robin to the replicas; the
writer rank of each replica decodes and writes them (video, PNG strip, optional frames, record last).
"""

import os
import time

import torch
import torch.distributed as dist

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.kernels import kernel_choice_lines
from osp_megatron.inference.jobs import is_done, remove_stale_temporaries, write_record
from osp_megatron.inference.replicas import SamplingLayout
from osp_megatron.inference.video_io import write_frame_strip, write_frames, write_video


def pending_jobs(jobs, sample, weights: str) -> list:
    """The jobs without a matching record, decided on rank 0 and shared with every rank (as is a refusal, so
    that no rank waits for a list that never comes)."""
    decision = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            remove_stale_temporaries(jobs)
            decision = [[job.index for job in jobs if not is_done(job, job.settings(sample, weights))]]
        except ConfigError as err:
            decision = [str(err)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], str):
        raise ConfigError(decision[0])
    wanted = set(decision[0])
    return [job for job in jobs if job.index in wanted]


def batches_of(jobs, batch_size: int) -> list[list]:
    """Consecutive same-sized videos, at most batch_size together (sizes may differ per prompt-file line)."""
    batches = []
    for job in jobs:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].size == job.size:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


class SamplingProgress:
    """Console bar (videos, videos/s over all replicas, ETA) and, with a log_dir, metrics.jsonl / TensorBoard
    lines (sample/videos_per_s, sample/seconds_per_video, sample/eta_s), on rank 0 only."""

    def __init__(self, log_dir, total: int, replicas: int, enabled: bool, console: bool):
        from osp_megatron.engine.metrics import MetricsLogger

        self.enabled, self.replicas, self.total, self.done = enabled, replicas, total, 0
        self.started = time.time()
        self.logger = MetricsLogger(
            log_dir, total_steps=total, start_step=0, enabled=enabled and log_dir is not None, progress=False
        )
        self.bar = None
        if not enabled:
            return
        if console:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="videos (replica 0)", unit="video", dynamic_ncols=True)

    def update(self, videos: int, seconds: float) -> None:
        choices = kernel_choice_lines()  # taken on every rank, so that none piles up
        if not self.enabled:
            return
        for line in choices:
            text = f"[osp-sample] kernel choice: {line}"
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)
        self.done += videos
        elapsed = time.time() - self.started
        rate = self.done * self.replicas / max(elapsed, 1e-9)
        eta = elapsed / self.done * (self.total - self.done)
        self.logger.log(
            self.done, {"sample/videos_per_s": rate, "sample/seconds_per_video": seconds / videos, "sample/eta_s": eta}
        )
        if self.bar is not None:
            self.bar.set_postfix(all_replicas=f"{rate:.3g} video/s", refresh=False)
            self.bar.update(videos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()


def write_outputs(job, video: torch.Tensor, sample, settings: dict, **extra) -> None:
    """The video, its PNG strip, its frames if asked, and last the record that marks it done."""
    write_video(job.video, video, fps=sample.fps)
    write_frame_strip(job.strip, video)
    if sample.frames:
        write_frames(os.path.splitext(job.video)[0] + "_frames", video)
    write_record(job, settings, **extra)


def generate_videos(pipeline, jobs, sample, layout: SamplingLayout, weights: str, log_dir, progress: bool = True):
    """Render every job of `jobs` without a record; returns (rendered by this replica, skipped as done).

    Every rank of the job calls this with the same jobs; ranks of one replica render the same batches.
    """
    todo = pending_jobs(jobs, sample, weights)
    batches = batches_of(todo, sample.batch_size)
    mine = batches[layout.replica :: layout.replicas]
    logging_rank = not dist.is_initialized() or dist.get_rank() == 0
    tracker = SamplingProgress(log_dir, sum(len(b) for b in mine), layout.replicas, logging_rank, progress)
    if logging_rank and len(todo) < len(jobs):
        print(
            f"[osp-sample] {len(jobs) - len(todo)} of {len(jobs)} videos are done already; rendering "
            f"{len(todo)} over {layout.replicas} model replica(s)"
        )
    try:
        for batch in mine:
            tick = time.time()
            num_frames, height, width = batch[0].size
            latents = pipeline.sample_latents(
                [job.prompt for job in batch],
                [job.negative_prompt for job in batch],
                [job.seed for job in batch],
                num_frames,
                height,
                width,
                sample.num_steps,
                sample.shift,
                sample.guidance_scale,
                sample.sampler,
                progress=progress and logging_rank,
                cfg_group=layout.cfg_group,
            )
            if layout.writer:
                videos = pipeline.vae.decode(latents)
                seconds = time.time() - tick
                for job, video in zip(batch, videos):
                    write_outputs(
                        job,
                        video,
                        sample,
                        job.settings(sample, weights),
                        seconds=seconds / len(batch),
                        batch=len(batch),
                        replicas=layout.replicas,
                    )
            tracker.update(len(batch), time.time() - tick)
    finally:
        tracker.close()
    return sum(len(b) for b in mine), len(jobs) - len(todo)
