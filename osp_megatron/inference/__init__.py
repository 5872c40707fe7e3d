"""Inference: rectified-flow sampling with guidance, the text-to-video pipeline and .mp4 input/output.

`osp-sample` (cli.py) drives TextToVideoPipeline from a SampleConfig.
"""

from osp_megatron.inference.config import SampleConfig
from osp_megatron.inference.pipeline import TextToVideoPipeline
from osp_megatron.inference.sampler import flow_timesteps, sample_flow, shift_sigmas
from osp_megatron.inference.video_io import read_video, write_video

__all__ = ["SampleConfig", "TextToVideoPipeline", "flow_timesteps", "read_video", "sample_flow", "shift_sigmas",
           "write_video"]
