"""Latent and video sizes of a video codec from its channels and strides, shared by the Wan VAE and the block VAE.

A size the strides do not divide is refused with the setting that names it.
"""

from osp_megatron.config.errors import ConfigError


class VideoShapes:
    """Latent and video sizes of a codec with `latent_channels` and strides (`temporal_stride`, `spatial_stride`)."""

    def latent_shape(self, num_frames, height, width):
        """(C, T, h, w) of the latents of a num_frames x height x width video."""
        self.check_video_size(num_frames, height, width)
        return (
            self.latent_channels,
            1 + (num_frames - 1) // self.temporal_stride,
            height // self.spatial_stride,
            width // self.spatial_stride,
        )

    def check_video_size(self, num_frames, height, width, where="video"):
        """Raise ConfigError unless frames = 1 + k * temporal stride and height, width divide the spatial stride."""
        if num_frames < 1 or (num_frames - 1) % self.temporal_stride:
            raise ConfigError(
                f"{where}: num_frames must be 1 + a multiple of the VAE temporal stride {self.temporal_stride} "
                f"(e.g. 81), got {num_frames}"
            )
        for name, size in (("height", height), ("width", width)):
            if size < 1 or size % self.spatial_stride:
                raise ConfigError(
                    f"{where}: {name} must be a positive multiple of the VAE spatial stride {self.spatial_stride}, "
                    f"got {size}"
                )
