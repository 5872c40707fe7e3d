"""The main job end to end through the console scripts: osp-train on the tiny default, then osp-sample."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from osp_megatron.inference.video_io import read_video

ROOT = Path(__file__).resolve().parents[2]


def _run(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tiny_default_trains_checkpoints_logs_and_samples(tmp_path):
    """osp-train on examples/tiny_t2v.yaml generates shards, learns (loss falls), writes a checkpoint,
    TensorBoard events, metrics.jsonl and an .mp4; osp-sample renders a prompt from that checkpoint."""
    run_dir = tmp_path / "run"
    _run(["osp_megatron.training.cli", "--config", str(ROOT / "examples" / "tiny_t2v.yaml"), f"run.dir={run_dir}",
          f"data.path={tmp_path / 'data'}", "train.steps=120", "checkpoint.interval=60", "train.progress=false",
          "sample.num_steps=4"], cwd=tmp_path)
    assert any((tmp_path / "data").glob("shard-*.tar"))
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 121))
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tflops"):
        assert key in rows[0]
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000120"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    video = read_video(str(run_dir / "samples" / "step_00000120.mp4"))
    assert video.shape == (9, 128, 128, 3)
    assert (run_dir / "samples" / "step_00000120.png").is_file()

    out = tmp_path / "prompted.mp4"
    _run(["osp_megatron.inference.cli", "--checkpoint", str(run_dir), "--prompt", "a blue circle moving up",
          "--steps", "3", "--output", str(out)], cwd=tmp_path)
    assert read_video(str(out)).shape == (9, 128, 128, 3)
    assert out.with_suffix(".png").is_file()


def test_train_cli_rejects_unknown_key(tmp_path):
    """A misspelt override stops osp-train before any work, with the key in the message and exit code 2."""
    result = subprocess.run([sys.executable, "-m", "osp_megatron.training.cli", "--config",
                             str(ROOT / "examples" / "tiny_t2v.yaml"), "train.stepz=3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "train.stepz" in result.stderr
