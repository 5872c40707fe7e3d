"""Inference: flow-matching samplers with guidance, the text-to-video pipeline, video jobs over many ranks, .mp4 I/O.

`osp-sample` (cli.py) opens a SamplingSession (session.py) and renders a prompt list with it (docs/inference.md).
"""

from osp_megatron.utils.lazy import lazy_exports

_EXPORTS = {
    "SamplingSession": "session",
    "TextToVideoPipeline": "pipeline",
    "denoise": "sampler",
    "make_scheduler": "sampler",
    "flow_timesteps": "sampler",
    "sample_flow": "sampler",
    "shift_sigmas": "sampler",
    "read_video": "video_io",
    "write_video": "video_io",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
