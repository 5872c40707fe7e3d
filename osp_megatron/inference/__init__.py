"""Inference: rectified-flow sampling with guidance, the text-to-video pipeline and .mp4 input/output.

`osp-sample` (cli.py) drives TextToVideoPipeline from a SampleConfig.
"""

from osp_megatron.utils.lazy import lazy_exports

_EXPORTS = {
    "SampleConfig": "config",
    "TextToVideoPipeline": "pipeline",
    "flow_timesteps": "sampler",
    "sample_flow": "sampler",
    "shift_sigmas": "sampler",
    "read_video": "video_io",
    "write_video": "video_io",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
