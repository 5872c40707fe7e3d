"""The README's first run, judged by its picture: osp-train on the tiny default renders samples whose frames show
the colour, shape and motion their prompts name."""

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osp_megatron.data.synthetic import COLOUR_RGB, COLOURS, MOTIONS, SHAPES, all_captions, caption_of, measure_blob
from osp_megatron.engine.config import load_job_config
from osp_megatron.inference.video_io import read_video

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_t2v.yaml"


def _strip_frames(path, width, gap=2):
    """Cut a PNG frame strip (frames side by side, `gap` white columns between them) back into frames."""
    strip = np.asarray(Image.open(path).convert("RGB"))
    count = (strip.shape[1] + gap) // (width + gap)
    return np.stack([strip[:, i * (width + gap) : i * (width + gap) + width] for i in range(count)])


def test_example_prompt_is_in_the_synthetic_set():
    """The example samples a caption the synthetic set holds, with the block VAE that makes it a picture."""
    config = load_job_config(EXAMPLE, [])
    assert config.sample.prompts[0] in all_captions()
    assert config.model.vae == "tiny-block" and config.data.synthetic_vae == "tiny-block"


# Twelve prompts that cover every colour twice, every shape three times and every motion at least twice.
PROMPTS = [
    "a red square moving right",
    "a green circle moving up",
    "a blue square moving left",
    "a yellow circle moving down",
    "a purple square moving right",
    "a white circle moving left",
    "a red wide bar moving down",
    "a green tall bar moving left",
    "a blue circle staying still",
    "a yellow tall bar moving up",
    "a purple wide bar moving left",
    "a white square moving down",
]


def _words(prompt):
    """(colour, shape, motion) of a synthetic caption."""
    return next(words for words in itertools.product(COLOURS, SHAPES, MOTIONS) if caption_of(*words) == prompt)


@pytest.mark.slow
def test_first_run_sample_shows_the_prompt(main_job, run_python_module, tmp_path):
    """After the tiny default's run, its sample's shape has the prompt's colour (nearest palette entry) in the
    PNG strip as in the video; and from its checkpoint, osp-sample draws twelve prompts whose colour, shape and
    motion, read back from the pixels by measure_blob, mostly match the prompt."""
    run_dir = main_job.run_dir
    config = load_job_config(EXAMPLE, [])
    prompt = config.sample.prompts[0]
    colour = _words(prompt)[0]
    sample = run_dir / "samples" / f"step_{config.train.steps:08d}"
    frames = _strip_frames(sample.with_suffix(".png"), config.sample.width)
    assert frames.shape == (config.sample.num_frames, config.sample.height, config.sample.width, 3)
    shown = measure_blob(frames)
    assert shown.colour == colour, (shown.rgb, COLOUR_RGB[colour])
    assert measure_blob(read_video(str(sample.with_suffix(".mp4")))).colour == colour

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run_python_module(
        [
            "osp_megatron.inference.cli",
            "--checkpoint",
            str(run_dir),
            "--prompt-file",
            str(tmp_path / "prompts.txt"),
            "--output-dir",
            str(tmp_path / "videos"),
            "--no-progress",
            "--batch-size",
            str(len(PROMPTS)),
        ],
        cwd=tmp_path,
    )
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == len(PROMPTS)
    drawn = [measure_blob(read_video(str(video))) for video in videos]
    got = [(d.colour, d.shape(), d.motion()) for d in drawn]
    right = [sum(g[k] == _words(p)[k] for g, p in zip(got, PROMPTS)) for k in range(3)]
    # Measured (docs/training.md, "What the tiny DiT learns"): 12, 7 and 11 of 12 with the shipped seed, 12 / 7-8
    # / 11-12 with two others; chance is 2, 3 and 2.4. Squares are mostly drawn like circles.
    assert right[0] >= 10 and right[1] >= 5 and right[2] >= 9, (right, list(zip(PROMPTS, got)))
