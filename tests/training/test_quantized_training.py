"""Quantized training through osp-train's Trainer: HiF8 / FP8 emulation stays with the fp32 loss curve."""

import json

import pytest
import torch

from osp_megatron.engine.config import load_job_config
from osp_megatron.engine.ranks import run_on_ranks

pytestmark = pytest.mark.slow  # each recipe trains in a rank process of its own (run_on_ranks)

# Mean loss of the last 10 of 40 steps may differ from the fp32 run by at most this fraction.
MARGIN = 0.10


def _train(rank, world_size, overrides):
    from osp_megatron.training.trainer import Trainer

    trainer = Trainer(load_job_config("examples/tiny_t2v.yaml", overrides))
    result = trainer.train()
    return result, list(trainer.built.parallelized.quantized)


def _tail_loss(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return sum(r["loss"] for r in rows[-10:]) / 10


def test_hif8_and_fp8_training_track_fp32(tmp_path):
    """40 steps with quant.recipe=hif8 (and fp8_hybrid) end within 10% of the fp32 loss; the quantized layers
    are the blocks' linears only, and the checkpoint carries every layer's amax history."""
    common = [
        "train.steps=40",
        "train.sample_at_end=false",
        "train.progress=false",
        "model.num_layers=2",
        f"data.path={tmp_path / 'data'}",
        "train.eval_interval=0",
        "data.synthetic_num_samples=64",
        "data.synthetic_samples_per_shard=32",
        "checkpoint.interval=0",
    ]
    run_on_ranks(_train, 1, common + [f"run.dir={tmp_path / 'fp32'}"])
    baseline = _tail_loss(tmp_path / "fp32")
    for recipe in ("hif8", "fp8_hybrid"):
        run_dir = tmp_path / recipe
        _, layers = run_on_ranks(_train, 1, common + [f"run.dir={run_dir}", f"quant.recipe={recipe}"])[0]
        assert layers and all(name.startswith("blocks.") for name in layers)
        assert len(layers) == 2 * 10  # per block: 4 self-attention, 4 cross-attention, 2 MLP linears
        loss = _tail_loss(run_dir)
        assert abs(loss - baseline) <= MARGIN * baseline, (recipe, loss, baseline)
        saved = torch.load(run_dir / "checkpoints" / "step_00000040" / "ranks" / "rank00000.pt", weights_only=False)
        assert set(saved["quant"]) == set(layers)
        assert "amax" in json.dumps(saved["quant"], default=str).lower()
