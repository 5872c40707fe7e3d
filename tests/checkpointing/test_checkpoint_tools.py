"""osp-ckpt on distributed checkpoints: inspect, average, export (diffusers and Wan2.1 layouts) and reshard give
exactly the tensors they promise."""

import json

import pytest
import torch
from safetensors.torch import load_file

from osp_ckpt.cli import main
from osp_megatron.checkpointing.offline import read_checkpoint_tensors
from osp_megatron.checkpointing.wan_keys import DIFFUSERS, ORIGINAL, OURS, rename

MODEL = {
    "preset": "tiny",
    "num_layers": 2,
    "dim": 24,
    "num_heads": 2,
    "ffn_dim": 40,
    "text_dim": 16,
    "freq_dim": 32,
    "in_channels": 4,
    "out_channels": 4,
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Checkpoints of steps 1 and 2 of one tiny run (weights, EMA, AdamW state), saved in this process."""
    from osp_megatron.checkpointing.checkpoint import save_checkpoint
    from osp_megatron.config.loader import from_dict, to_dict
    from osp_megatron.engine.config import TrainConfig
    from osp_megatron.engine.optim import EMA, build_optimizer
    from osp_megatron.models.builder import build_model
    from osp_megatron.models.config import ModelConfig
    from osp_megatron.parallel.state import ensure_single_rank_group

    ensure_single_rank_group()
    torch.manual_seed(0)
    config = from_dict(ModelConfig, MODEL, "model")
    model = build_model(config)
    optimizer, ema = build_optimizer(model, TrainConfig(lr=1e-2)), EMA(model, 0.5)
    run_dir = tmp_path_factory.mktemp("tools_run")
    paths = []
    for step in (1, 2):
        out = model(torch.randn(1, 4, 1, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 16))
        out.square().mean().backward()
        optimizer.step()
        ema.update(model)
        paths.append(
            save_checkpoint(
                run_dir,
                step,
                model,
                optimizer,
                ema,
                rank_state={"step": step},
                metadata={"model_config": to_dict(config)},
            )
        )
    return paths


def test_inspect_lists_layout_and_tensors(two_checkpoints, capsys):
    """inspect names the format, step and writing layout, and with --tensors every tensor's full shape."""
    assert main(["inspect", str(two_checkpoints[0]), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "osp-megatron-checkpoint/2" in out and "step: 1" in out
    assert "written under: tensor=1 data=1 ssp=1 ulysses=1 fsdp=false (world size 1)" in out
    assert "optimizer:" in out and "ema:" in out
    assert "  blocks.0.mlp.linear_fc1.weight  [40, 24]  float32" in out


def test_average_is_the_mean_of_model_and_ema(two_checkpoints, tmp_path):
    """average writes a weights-only checkpoint whose model and EMA tensors are the inputs' means."""
    first, second = two_checkpoints
    assert main(["average", str(first), str(second), "-o", str(tmp_path / "avg")]) == 0
    metadata = json.loads((tmp_path / "avg" / "metadata.json").read_text())
    assert metadata["step"] == 2 and len(metadata["averaged_from"]) == 2
    for which in ("model", "ema"):
        a, b = read_checkpoint_tensors(first, which), read_checkpoint_tensors(second, which)
        averaged = read_checkpoint_tensors(tmp_path / "avg", which)
        assert averaged.keys() == a.keys()
        for name in a:
            assert torch.equal(averaged[name], ((a[name].double() + b[name].double()) / 2).float()), name
    assert read_checkpoint_tensors(tmp_path / "avg", "optimizer") == {}
    assert main(["verify", str(tmp_path / "avg")]) == 0


def test_export_ema_in_both_layouts(two_checkpoints, tmp_path):
    """export --which ema --dtype bfloat16 writes the EMA under diffusers' names; --format original under
    Wan2.1's, which checkpoint.load's reader maps back to the same tensors."""
    from osp_megatron.checkpointing.pretrained import load_pretrained

    checkpoint = two_checkpoints[1]
    ema = read_checkpoint_tensors(checkpoint, "ema")
    assert main(["export", str(checkpoint), str(tmp_path / "diffusers"), "--which", "ema", "--dtype", "bfloat16"]) == 0
    exported = load_file(str(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == {rename(name, OURS, DIFFUSERS) for name in ema}
    for name, tensor in ema.items():
        assert torch.equal(exported[rename(name, OURS, DIFFUSERS)], tensor.to(torch.bfloat16)), name
    assert main(["export", str(checkpoint), str(tmp_path / "original"), "--format", "original"]) == 0
    original = load_file(str(tmp_path / "original" / "diffusion_pytorch_model.safetensors"))
    model = read_checkpoint_tensors(checkpoint, "model")
    assert original.keys() == {rename(name, OURS, ORIGINAL) for name in model}
    assert json.loads((tmp_path / "original" / "config.json").read_text())["_class_name"] == "WanModel"
    reloaded = dict(load_pretrained(tmp_path / "original").named_parameters())
    for name, tensor in model.items():
        assert torch.equal(reloaded[name].detach(), tensor), name


@pytest.mark.slow
def test_reshard_converts_a_tensor_parallel_safetensors_checkpoint(tiny_diffusers, tmp_path):
    """reshard of a format-1 checkpoint (tensor-parallel safetensors, here from `import --tensor-parallel 2`) for
    data=2 with FSDP: the two ranks read it into their FSDP shards and write a distributed checkpoint holding
    the same tensors, recording the new layout."""
    from osp_megatron.checkpointing.sharded import iter_full_tensors

    _, folder = tiny_diffusers
    source, output = tmp_path / "imported", tmp_path / "dp2_fsdp"
    assert main(["import", str(folder), str(source), "--tensor-parallel", "2"]) == 0
    assert main(["reshard", str(source), str(output), "--data", "2", "--fsdp"]) == 0
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["format"] == "osp-megatron-checkpoint/2" and metadata["resharded_from"] == str(source)
    assert metadata["layout"] == {"world_size": 2, "tensor": 1, "data": 2, "ssp": 1, "ulysses": 1, "fsdp": True}
    assert sorted(p.name for p in (output / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    expected, got = dict(iter_full_tensors(source / "model")), read_checkpoint_tensors(output, "model")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert main(["verify", str(output)]) == 0
