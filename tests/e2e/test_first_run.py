"""The README's first run, judged by its picture: osp-train on the tiny default renders a sample whose frames show
a shape in the colour its prompt names."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osp_megatron.config.job import load_job_config
from osp_megatron.data.synthetic import COLOURS, COLOUR_RGB, MOTIONS, all_captions, measure_blob
from osp_megatron.inference.video_io import read_video

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_t2v.yaml"


def _strip_frames(path, width, gap=2):
    """Cut a PNG frame strip (frames side by side, `gap` white columns between them) back into frames."""
    strip = np.asarray(Image.open(path).convert("RGB"))
    count = (strip.shape[1] + gap) // (width + gap)
    return np.stack([strip[:, i * (width + gap): i * (width + gap) + width] for i in range(count)])


def test_example_prompt_is_in_the_synthetic_set():
    """The example samples a caption the synthetic set holds, with the block VAE that makes it a picture."""
    config = load_job_config(EXAMPLE, [])
    assert config.sample.prompts[0] in all_captions()
    assert config.model.vae == "tiny-block" and config.data.synthetic_vae == "tiny-block"


@pytest.mark.slow
def test_first_run_sample_shows_the_prompt(main_job, run_python_module, tmp_path):
    """After the tiny default's run, its sample's shape has the prompt's colour (nearest palette entry) in the
    PNG strip as in the video; and from its checkpoint, osp-sample draws at least five of six prompts, one per
    palette colour, in their colour (the DiT follows the colour word of its prompt)."""
    run_dir = main_job.run_dir
    config = load_job_config(EXAMPLE, [])
    prompt = config.sample.prompts[0]
    colour = next(c for c in COLOURS if f" {c} " in prompt)
    sample = run_dir / "samples" / f"step_{config.train.steps:08d}"
    frames = _strip_frames(sample.with_suffix(".png"), config.sample.width)
    assert frames.shape == (config.sample.num_frames, config.sample.height, config.sample.width, 3)
    shown = measure_blob(frames)
    assert shown.colour == colour, (shown.rgb, COLOUR_RGB[colour])
    assert measure_blob(read_video(str(sample.with_suffix(".mp4")))).colour == colour

    prompts = [f"a {c} {('square', 'circle')[i % 2]} {MOTIONS[i % len(MOTIONS)]}" for i, c in enumerate(COLOURS)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    run_python_module(["osp_megatron.inference.cli", "--checkpoint", str(run_dir), "--prompt-file",
                       str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "videos"), "--no-progress",
                       "--batch-size", str(len(COLOURS))],
                      cwd=tmp_path)
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == len(COLOURS)
    drawn = [measure_blob(read_video(str(video))).colour for video in videos]
    assert sum(d == c for d, c in zip(drawn, COLOURS)) >= 5, list(zip(COLOURS, drawn))
