"""Text-to-video generation: encode prompts, integrate the flow from seeded noise, decode with the VAE.

The model is any callable model(latents, timestep, text_states) -> velocity, e.g. the DiT's forward.
"""

import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.sampler import sample_flow
from osp_megatron.inference.video_io import write_video


class TextToVideoPipeline:
    """Frozen DiT + VAE + text encoder; calling it returns videos [B, 3, F, H, W] in [-1, 1]."""

    def __init__(self, model, vae, text_encoder, latent_channels=16, patch_size=(1, 2, 2), device=None):
        if latent_channels != vae.latent_channels:
            raise ConfigError(f"the model's latent_channels ({latent_channels}) differ from the VAE's "
                              f"({vae.latent_channels})")
        if isinstance(patch_size, int):
            patch_size = (1, patch_size, patch_size)
        self.model = model
        self.vae = vae
        self.text_encoder = text_encoder
        self.latent_channels = latent_channels
        self.patch_size = tuple(patch_size)
        if device is None:
            parameters = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
            device = parameters[0].device if parameters else torch.device("cpu")
        self.device = torch.device(device)

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
                raise ConfigError(f"sample: {name}={size} gives {latent_size} latent positions, not a multiple of "
                                  f"the patch size {patch} (VAE stride {stride})")
        return self.latent_channels, frames, latent_height, latent_width

    def velocity(self, latents, timestep, text_states):
        return self.model(latents.to(self.device), timestep.to(self.device), text_states.to(self.device))

    @torch.no_grad()
    def __call__(self, prompts, negative_prompt="", num_frames=81, height=480, width=832, num_steps=50, shift=5.0,
                 guidance_scale=5.0, seed=0, progress=False):
        """Generate one video per prompt from noise seeded by `seed` -> float32 [B, 3, F, H, W] in [-1, 1]."""
        if isinstance(prompts, str):
            prompts = [prompts]
        shape = self.latent_shape(num_frames, height, width)
        was_training = getattr(self.model, "training", False)
        if was_training:
            self.model.eval()
        try:
            text_states, _ = self.text_encoder.encode(list(prompts))
            null_states = None
            if guidance_scale != 1.0:
                null_states, _ = self.text_encoder.encode([negative_prompt])
            generator = torch.Generator().manual_seed(seed)
            # Noise is drawn on the CPU so the same seed gives the same video on any device.
            noise = torch.randn((len(prompts), *shape), generator=generator).to(self.device)
            latents = sample_flow(self.velocity, noise, text_states.to(self.device),
                                  None if null_states is None else null_states.to(self.device),
                                  num_steps=num_steps, shift=shift, guidance_scale=guidance_scale, progress=progress)
        finally:
            if was_training:
                self.model.train()
        return self.vae.decode(latents)

    def generate(self, config, progress=True):
        """Run a validated SampleConfig and write one .mp4 per prompt; return the written paths."""
        config.validate()
        videos = self(config.prompts, config.negative_prompt, config.num_frames, config.height, config.width,
                      config.num_steps, config.shift, config.guidance_scale, config.seed, progress=progress)
        paths = config.output_paths()
        for video, path in zip(videos, paths):
            write_video(path, video, fps=config.fps)
        return paths
