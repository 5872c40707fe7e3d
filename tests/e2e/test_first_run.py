"""The README's first run, judged by its picture: osp-train on the tiny default renders a sample whose frames show
the prompt's colour where the shape is, moving the prompt's way."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osp_megatron.config.job import load_job_config
from osp_megatron.data.synthetic import COLOURS, COLOUR_RGB, MOTIONS, all_captions, measure_blob

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_t2v.yaml"


def _strip_frames(path, width, gap=2):
    """Cut a PNG frame strip (frames side by side, `gap` white columns between them) back into frames."""
    strip = np.asarray(Image.open(path).convert("RGB"))
    count = (strip.shape[1] + gap) // (width + gap)
    return np.stack([strip[:, i * (width + gap): i * (width + gap) + width] for i in range(count)])


def test_example_prompt_is_in_the_synthetic_set():
    """The example samples a caption the synthetic set holds, with the fitted VAE that makes it a picture."""
    config = load_job_config(EXAMPLE, [])
    assert config.sample.prompts[0] in all_captions()
    assert config.model.vae == "tiny-fitted" and config.data.synthetic_vae == "tiny-fitted"


@pytest.mark.slow
def test_first_run_sample_shows_the_prompt(main_job):
    """After the tiny default's run, the sample's shape has the prompt's colour (nearest palette entry) and its
    centre travels the prompt's way across the frames; the PNG strip shows the same frames as the video."""
    run_dir = main_job.run_dir
    config = load_job_config(EXAMPLE, [])
    prompt = config.sample.prompts[0]
    colour = next(c for c in COLOURS if f" {c} " in prompt)
    motion = next(m for m in MOTIONS if prompt.endswith(m))
    frames = _strip_frames(run_dir / "samples" / f"step_{config.train.steps:08d}.png", config.sample.width)
    assert frames.shape == (config.sample.num_frames, config.sample.height, config.sample.width, 3)
    shown = measure_blob(frames)
    assert shown.colour == colour, (shown.rgb, COLOUR_RGB[colour])
    assert shown.motion() == motion, shown.centres
    assert np.all(np.isfinite(shown.centres))
