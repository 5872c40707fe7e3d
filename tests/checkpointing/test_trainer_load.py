"""checkpoint.load: osp-train starts fine-tuning from a diffusers folder as well as from a framework checkpoint."""

import pytest
import torch
from safetensors.torch import load_file

from osp_megatron.engine.config import load_job_config
from osp_megatron.engine.ranks import run_on_ranks

MODEL = [
    "model.dim=24",
    "model.num_heads=2",
    "model.ffn_dim=40",
    "model.text_dim=16",
    "model.freq_dim=32",
    "model.num_layers=2",
    "model.in_channels=4",
    "model.out_channels=4",
    "model.vae=tiny-random",
    "model.sparse_ratio=2",
    "model.full_blocks=1",
]


def _initial_weights(rank, world_size, overrides):
    from osp_megatron.training.trainer import Trainer

    trainer = Trainer(load_job_config("examples/tiny_t2v.yaml", overrides))
    named = dict(trainer.model.named_parameters())
    return {
        name: named[name].detach().clone()
        for name in ("blocks.0.self_attention.linear_q.weight", "blocks.1.mlp.linear_fc2.weight", "head_modulation")
    }


@pytest.mark.slow
def test_checkpoint_load_accepts_a_diffusers_folder(tmp_path, tiny_diffusers):
    """With checkpoint.load=<diffusers transformer folder> the (sparse) model starts from exactly those weights."""
    _, folder = tiny_diffusers
    overrides = MODEL + [
        f"checkpoint.load={folder}",
        f"run.dir={tmp_path / 'run'}",
        f"data.path={tmp_path / 'data'}",
        "train.eval_interval=0",
        "data.synthetic_num_samples=8",
        "data.synthetic_samples_per_shard=8",
    ]
    weights = run_on_ranks(_initial_weights, 1, overrides)[0]
    reference = {}
    for file in folder.glob("*.safetensors"):
        reference.update(load_file(str(file)))
    assert torch.equal(weights["blocks.0.self_attention.linear_q.weight"], reference["blocks.0.attn1.to_q.weight"])
    assert torch.equal(weights["blocks.1.mlp.linear_fc2.weight"], reference["blocks.1.ffn.net.2.weight"])
    assert torch.equal(weights["head_modulation"], reference["scale_shift_table"])
