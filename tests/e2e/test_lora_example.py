"""LoRA fine-tuning end to end: osp-train on examples/train_lora_tiny.yaml as shipped, from the main job's
pretraining, writes adapter-only checkpoints and a merged model that osp-sample renders."""

import pytest

from osp_megatron.checkpointing.offline import stored_shapes
from osp_megatron.inference.video_io import read_video


@pytest.mark.slow
def test_lora_example_trains_adapters_and_merges(lora_example, run_python_module, tmp_path):
    """Only the folders differ from the example: it trains, its checkpoints hold adapters alone, and the merged
    model in run.dir/merged samples a video."""
    run_dir, stdout = lora_example
    assert "LoRA rank 8 on 32 linears" in stdout and "LoRA merged into the weights" in stdout
    final = run_dir / "checkpoints" / "step_00000100"
    assert all("lora_" in name for name in stored_shapes(final, "model"))
    video = tmp_path / "merged.mp4"
    run_python_module(
        ["osp_megatron.inference.cli", "--checkpoint", str(run_dir / "merged"), "--output", str(video)], cwd=tmp_path
    )
    assert read_video(str(video)).shape[0] == 9
