"""The main job end to end through the console scripts: osp-train on the tiny default, then osp-sample."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from osp_megatron.engine.config import load_job_config
from osp_megatron.inference.video_io import read_video

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_t2v.yaml"


@pytest.mark.slow
def test_tiny_default_trains_checkpoints_logs_and_samples(main_job, run_python_module, tmp_path):
    """osp-train on examples/tiny_t2v.yaml generates shards, learns (loss falls), logs a held-out loss, writes
    checkpoints, TensorBoard events, metrics.jsonl and an .mp4 with its frame strip; osp-sample renders a
    prompt from that checkpoint."""
    config = load_job_config(EXAMPLE, [])
    steps, run_dir = config.train.steps, main_job.run_dir
    assert any(main_job.data_dir.glob("shard-*.tar"))
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tflops"):
        assert key in rows[0]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:10]) / 10
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    interval = config.train.eval_interval
    assert [s for s, _ in evals] == list(range(interval, steps + 1, interval))
    assert evals[-1][1] < evals[0][1]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    video = read_video(str(run_dir / "samples" / f"step_{steps:08d}.mp4"))
    assert video.shape == (config.sample.num_frames, config.sample.height, config.sample.width, 3)
    assert (run_dir / "samples" / f"step_{steps:08d}.png").is_file()

    out = tmp_path / "prompted.mp4"
    run_python_module(
        [
            "osp_megatron.inference.cli",
            "--checkpoint",
            str(run_dir),
            "--prompt",
            "a blue circle moving up",
            "--steps",
            "3",
            "--output",
            str(out),
        ],
        cwd=tmp_path,
    )
    assert read_video(str(out)).shape == video.shape
    assert out.with_suffix(".png").is_file()


@pytest.mark.slow
def test_train_cli_rejects_unknown_key(tmp_path):
    """A misspelt override stops osp-train before any work, with the key in the message and exit code 2."""
    result = subprocess.run(
        [sys.executable, "-m", "osp_megatron.training.cli", "--config", str(EXAMPLE), "train.stepz=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "train.stepz" in result.stderr
