"""Render videos from a DiT in this process: build the frozen encoders a job config names, sample, write .mp4.

Every tensor-parallel rank runs the sampler (the model is sharded); only the writing rank saves the file.
"""

import dataclasses
from pathlib import Path

import torch

from osp_megatron.inference.pipeline import TextToVideoPipeline
from osp_megatron.inference.video_io import write_frame_strip, write_video
from osp_megatron.models.text_encoder import build_text_encoder
from osp_megatron.models.vae import build_vae


def job_text_encoder(job_config, device="cpu"):
    """The text encoder of `model.text_encoder_path`, or (unset) the tiny random one seeded like the synthetic
    data set's, so prompts map to the states the model was trained on."""
    return build_text_encoder(
        job_config.model.text_encoder_path,
        job_config.model.text_dim,
        job_config.model.text_len,
        seed=job_config.data.synthetic_seed,
        device=device,
    )


def build_pipeline(model, job_config, device) -> TextToVideoPipeline:
    """Pipeline with the VAE and text encoder of `model.vae_path` / `model.text_encoder_path` (if unset, the tiny
    VAE `model.vae` names and the tiny random text encoder).

    The tiny random encoders are seeded like the synthetic data set's, so prompts map to the states the
    model was trained on.
    """
    vae = build_vae(
        job_config.model.vae_path, seed=job_config.data.synthetic_seed, device=device, tiny=job_config.model.vae
    )
    return TextToVideoPipeline(
        model,
        vae,
        job_text_encoder(job_config, device),
        latent_channels=job_config.model.in_channels,
        patch_size=tuple(job_config.model.patch_size),
        device=device,
    )


@torch.no_grad()
def render_sample(model, job_config, device, output=None, write: bool = True, progress: bool = False):
    """Generate the job's `sample` section with `model` into `output` (default: sample.output), each video with a
    PNG strip of its frames beside it (same name, .png); returns the written path(s)."""
    sample = job_config.sample
    if output is not None:
        sample = dataclasses.replace(sample, output=str(output))
    sample.validate()
    model.eval()
    pipeline = build_pipeline(model, job_config, device)
    videos = pipeline(
        sample.prompts,
        sample.negative_prompt,
        sample.num_frames,
        sample.height,
        sample.width,
        sample.num_steps,
        sample.shift,
        sample.guidance_scale,
        sample.seed,
        sample.sampler,
        progress=progress,
    )
    paths = [Path(p) for p in sample.output_paths()]
    if write:
        for video, path in zip(videos, paths):
            write_video(str(path), video, fps=sample.fps)
            write_frame_strip(str(path.with_suffix(".png")), video)
    return paths[0] if len(paths) == 1 else paths
