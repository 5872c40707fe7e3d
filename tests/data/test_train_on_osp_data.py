"""End to end: MP4 files -> `osp-data build` -> `osp-data encode` -> `osp-train`, and its resume.

The shards come from the session fixtures of conftest.py; training runs the example config's tiny DiT.
"""

import json
from pathlib import Path

import pytest
import torch

from osp_megatron.training.cli import main as train_main

ROOT = Path(__file__).resolve().parents[2]


def _train(run_dir, latent_dir, *overrides):
    args = [
        "--config",
        str(ROOT / "examples" / "train_osp_data.yaml"),
        f"run.dir={run_dir}",
        f"data.path={latent_dir}",
        "train.eval_interval=0",
        "data.num_workers=0",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "train.progress=false",
        "checkpoint.interval=0",
        *overrides,
    ]
    assert train_main(args) == 0


@pytest.mark.slow
def test_osp_train_trains_and_resumes_on_encoded_videos(latent_dir, tmp_path):
    """Three buckets of real clips train with finite losses; a run stopped at step 2 resumes the data stream."""
    run_dir = tmp_path / "run"
    _train(run_dir, latent_dir, "train.steps=4", "train.exit_interval=2")
    _train(run_dir, latent_dir, "train.steps=4")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["data_bad_samples"] == 0 for r in rows)
    state = torch.load(run_dir / "checkpoints" / "step_00000004" / "ranks" / "rank00000.pt", weights_only=False)
    assert state["data"]["format"] == "osp-loader-v2" and state["data"]["global_samples"] == 8
    assert state["data"]["micro_batch"] == 0
