"""Text-to-video generation: encode prompts, integrate the flow from seeded noise, decode with the VAE.

The model is any callable model(latents, timestep, text_states) -> velocity, e.g. the DiT's forward.
"""

import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.guidance import BatchedGuidance, ParallelGuidance, check_guidance_scale
from osp_megatron.inference.sampler import denoise
from osp_megatron.inference.video_io import write_video


def seeded_noise(seeds, shape) -> torch.Tensor:
    """[len(seeds), *shape] float32 noise, one CPU generator per video: a video's noise depends on its seed
    alone, not on the device, the batch it is rendered in, or the rank that renders it."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])


class TextToVideoPipeline:
    """Frozen DiT + VAE + text encoder; calling it returns videos [B, 3, F, H, W] in [-1, 1]."""

    def __init__(self, model, vae, text_encoder, latent_channels=16, patch_size=(1, 2, 2), device=None):
        if latent_channels != vae.latent_channels:
            raise ConfigError(
                f"the model's latent_channels ({latent_channels}) differ from the VAE's ({vae.latent_channels})"
            )
        if isinstance(patch_size, int):
            patch_size = (1, patch_size, patch_size)
        self.model = model
        self.vae = vae
        self.text_encoder = text_encoder
        self.latent_channels = latent_channels
        self.patch_size = tuple(patch_size)
        parameters = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        if device is None:
            device = parameters[0].device if parameters else torch.device("cpu")
        self.device = torch.device(device)
        # Inputs follow the weights' dtype (a bf16 inference copy gets bf16 latents, as diffusers does).
        self.dtype = parameters[0].dtype if parameters and parameters[0].is_floating_point() else torch.float32

    def latent_shape(self, num_frames, height, width):
        """(C, T, h, w) for a video size; raises ConfigError unless the VAE stride and the patch size divide it."""
        self.vae.check_video_size(num_frames, height, width, where="sample")
        _, frames, latent_height, latent_width = self.vae.latent_shape(num_frames, height, width)
        patch_t, patch_h, patch_w = self.patch_size
        vae_t, vae_s = self.vae.temporal_stride, self.vae.spatial_stride
        for name, size, latent_size, patch, stride in (
            ("num_frames", num_frames, frames, patch_t, vae_t),
            ("height", height, latent_height, patch_h, vae_s),
            ("width", width, latent_width, patch_w, vae_s),
        ):
            if latent_size % patch:
                raise ConfigError(
                    f"sample: {name}={size} gives {latent_size} latent positions, not a multiple of "
                    f"the patch size {patch} (VAE stride {stride})"
                )
        return self.latent_channels, frames, latent_height, latent_width

    def velocity(self, latents, timestep, text_states):
        return self.model(
            latents.to(self.device, self.dtype), timestep.to(self.device), text_states.to(self.device, self.dtype)
        )

    def _encode(self, prompts):
        return self.text_encoder.encode(list(prompts))[0].to(self.device)

    @torch.no_grad()
    def sample_latents(
        self,
        prompts,
        negative_prompts="",
        seeds=0,
        num_frames=81,
        height=480,
        width=832,
        num_steps=50,
        shift=5.0,
        guidance_scale=5.0,
        sampler="unipc",
        progress=False,
        cfg_group=None,
    ):
        """Normalised latents [B, C, T, h, w] (float32) of one video per prompt.

        negative_prompts: one string for all or one per prompt; seeds: an int (video i gets seed + i) or one per
        prompt. cfg_group: a two-rank group of ParallelGuidance (this rank's index in it picks its half); None
        batches both halves here.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negatives = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if not (len(prompts) == len(negatives) == len(seeds)):
            raise ConfigError(
                f"{len(prompts)} prompts need as many negative prompts and seeds, got {len(negatives)} and {len(seeds)}"
            )
        shape = self.latent_shape(num_frames, height, width)
        guided = check_guidance_scale(guidance_scale) != 1.0
        was_training = getattr(self.model, "training", False)
        if was_training:
            self.model.eval()
        try:
            noise = seeded_noise(seeds, shape).to(self.device)
            if cfg_group is not None and guided:
                import torch.distributed as dist

                own = negatives if dist.get_rank(cfg_group) == 1 else prompts
                velocity = ParallelGuidance(self.velocity, self._encode(own), guidance_scale, cfg_group)
            else:
                velocity = BatchedGuidance(
                    self.velocity, self._encode(prompts), self._encode(negatives) if guided else None, guidance_scale
                )
            return denoise(velocity, noise, num_steps, shift, sampler, progress)
        finally:
            if was_training:
                self.model.train()

    @torch.no_grad()
    def __call__(
        self,
        prompts,
        negative_prompt="",
        num_frames=81,
        height=480,
        width=832,
        num_steps=50,
        shift=5.0,
        guidance_scale=5.0,
        seed=0,
        sampler="unipc",
        progress=False,
    ):
        """Generate one video per prompt (video i from seed + i) -> float32 [B, 3, F, H, W] in [-1, 1]."""
        latents = self.sample_latents(
            prompts,
            negative_prompt,
            seed,
            num_frames,
            height,
            width,
            num_steps,
            shift,
            guidance_scale,
            sampler,
            progress,
        )
        return self.vae.decode(latents)

    def generate(self, config, progress=True):
        """Run a validated SampleConfig and write one .mp4 per prompt; return the written paths."""
        config.validate()
        videos = self(
            config.prompts,
            config.negative_prompt,
            config.num_frames,
            config.height,
            config.width,
            config.num_steps,
            config.shift,
            config.guidance_scale,
            config.seed,
            config.sampler,
            progress=progress,
        )
        paths = config.output_paths()
        for video, path in zip(videos, paths):
            write_video(path, video, fps=config.fps)
        return paths
