"""osp-ckpt import / export / inspect and load_pretrained: exact round trips, any TP size, clear errors.

Every checkpoint here is written by the test from a tiny random diffusers model.
"""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from osp_ckpt.cli import main
from osp_megatron.checkpointing.pretrained import load_pretrained
from osp_megatron.checkpointing.sharded import iter_full_tensors
from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel.state import ParallelConfig, destroy_distributed, init_distributed

GRID = (3, 5, 3)


def read_checkpoint(folder, which="model") -> dict[str, torch.Tensor]:
    return dict(iter_full_tensors(folder / which))


def assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name


def architecture(config) -> dict:
    """A diffusers config without its bookkeeping entries, tuples as lists."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in config.items()
        if not key.startswith("_")
    }


def test_export_then_reimport_is_bit_exact(tiny_diffusers, diffusers_loader, tmp_path):
    """import -> export -> import gives identical tensors, and the export holds the diffusers weights exactly."""
    reference, folder = tiny_diffusers
    assert main(["import", str(folder), str(tmp_path / "first")]) == 0
    assert main(["export", str(tmp_path / "first"), str(tmp_path / "exported")]) == 0
    assert main(["import", str(tmp_path / "exported"), str(tmp_path / "second")]) == 0
    assert_same_state(read_checkpoint(tmp_path / "second"), read_checkpoint(tmp_path / "first"))
    assert_same_state(
        load_file(str(tmp_path / "exported" / "diffusion_pytorch_model.safetensors")), reference.state_dict()
    )
    reloaded = diffusers_loader(tmp_path / "exported")
    assert architecture(reloaded.config) == architecture(reference.config)


def test_tp2_import_then_sharded_export_reproduces_original(tiny_diffusers, diffusers_loader, tmp_path):
    """Importing at TP=2 writes two shards; exporting them (in several files with an index) restores every
    original tensor bit for bit, and diffusers loads the result."""
    reference, folder = tiny_diffusers
    assert main(["import", str(folder), str(tmp_path / "tp2"), "--tensor-parallel", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "tp2" / "model").iterdir()) == [
        "tp00-of-02.safetensors",
        "tp01-of-02.safetensors",
    ]
    metadata = json.loads((tmp_path / "tp2" / "metadata.json").read_text())
    assert metadata["step"] == 0 and metadata["tensor_parallel"] == 2 and "format" in metadata
    assert metadata["model_config"]["dim"] == 24 and metadata["model_config"]["num_heads"] == 2
    assert main(["export", str(tmp_path / "tp2"), str(tmp_path / "exported"), "--max-shard-gb", str(20e3 / 2**30)]) == 0
    index = json.loads((tmp_path / "exported" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = diffusers_loader(tmp_path / "exported")
    assert_same_state(reloaded.state_dict(), reference.state_dict())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tensor_parallel_worker(rank, port, sources, inputs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    init_distributed(ParallelConfig(tensor=2))
    try:
        outputs = {}
        for label, source in sources.items():
            model = load_pretrained(source)
            assert model.blocks[0].self_attention.linear_q.weight.shape[0] == 12  # half of dim 24
            with torch.no_grad():
                outputs[label] = model(*inputs)
        torch.save(outputs, f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_tp2_model_on_two_ranks_matches_diffusers(tiny_diffusers, wan, tmp_path):
    """On two gloo ranks at TP=2, the model loaded from a TP=2 import, a TP=1 import (resharded on load) and the
    diffusers folder itself gives diffusers' output."""
    reference, folder = tiny_diffusers
    assert main(["import", str(folder), str(tmp_path / "tp2"), "-t", "2"]) == 0
    assert main(["import", str(folder), str(tmp_path / "tp1")]) == 0
    inputs = wan.random_inputs(reference, GRID)
    expected = wan.diffusers_output(reference, *inputs)
    sources = {"tp2": str(tmp_path / "tp2"), "tp1": str(tmp_path / "tp1"), "diffusers": str(folder)}
    mp.spawn(_tensor_parallel_worker, args=(_free_port(), sources, inputs, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        outputs = torch.load(tmp_path / f"rank{rank}.pt")
        for label, got in outputs.items():
            error = float((got - expected).norm() / expected.norm())
            assert error < 1e-5, (rank, label, error)


def test_missing_and_unexpected_keys_error_unless_allowed(tiny_diffusers, tmp_path, capsys):
    """A dropped tensor or a foreign one stops the import (naming it) unless explicitly allowed."""
    reference, folder = tiny_diffusers
    state = {name: tensor.contiguous() for name, tensor in reference.state_dict().items()}
    dropped = state.pop("blocks.1.attn2.norm_k.weight")
    state["blocks.0.extra_adapter.weight"] = torch.ones(3)
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    (broken / "config.json").write_text((folder / "config.json").read_text())

    assert main(["import", str(broken), str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "blocks.1.cross_attention.k_norm.weight" in error and "blocks.0.extra_adapter.weight" in error
    assert main(["import", str(broken), str(tmp_path / "b"), "--allow-missing"]) == 2
    assert main(["import", str(broken), str(tmp_path / "c"), "--allow-missing", "--allow-unexpected"]) == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    metadata = json.loads((tmp_path / "c" / "metadata.json").read_text())
    assert metadata["imported_from"]["missing"] == ["blocks.1.cross_attention.k_norm.weight"]

    with pytest.raises(ConfigError, match="missing"):
        load_pretrained(tmp_path / "c")
    model = load_pretrained(tmp_path / "c", allow_missing=True)
    assert torch.equal(model.blocks[1].cross_attention.q_norm.weight, state["blocks.1.attn2.norm_q.weight"])
    assert not torch.equal(model.blocks[1].cross_attention.k_norm.weight, dropped)
    with pytest.raises(ConfigError, match="extra_adapter"):
        load_pretrained(broken, allow_missing=True)


def test_wrong_paths_and_unsupported_models_error_clearly(tiny_diffusers, tmp_path):
    """Missing files, shards or config options raise ConfigError naming the file and the expected layout; an
    existing output is only replaced with --overwrite."""
    _, folder = tiny_diffusers
    with pytest.raises(ConfigError, match="nowhere.*not exist.*expected a diffusers"):
        load_pretrained(tmp_path / "nowhere")
    assert main(["import", str(tmp_path / "nowhere.pth"), str(tmp_path / "x")]) == 2

    index = tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"weight_map": {"patch_embedding.weight": "gone-00001.safetensors"}}))
    with pytest.raises(ConfigError, match="gone-00001.safetensors"):
        load_pretrained(index.parent)

    assert main(["import", str(folder), str(tmp_path / "tp2"), "-t", "2"]) == 0
    assert main(["import", str(folder), str(tmp_path / "tp2")]) == 2  # exists: needs --overwrite
    assert main(["import", str(folder), str(tmp_path / "tp2"), "-t", "2", "--overwrite"]) == 0
    (tmp_path / "tp2" / "model" / "tp01-of-02.safetensors").unlink()
    with pytest.raises(ConfigError, match="tp01-of-02.safetensors"):
        load_pretrained(tmp_path / "tp2")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no weight file"):
        load_pretrained(empty)

    image = tmp_path / "i2v"
    image.mkdir()
    config = json.loads((folder / "config.json").read_text()) | {"image_dim": 1280, "added_kv_proj_dim": 24}
    (image / "config.json").write_text(json.dumps(config))
    (image / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(ConfigError, match="image conditioning"):
        load_pretrained(image)


def test_load_pretrained_sparse_override_and_bf16(tiny_diffusers, wan, tmp_path):
    """Full-attention weights load into a Skiparse model unchanged; dtype='bfloat16' gives a bf16 copy."""
    reference, folder = tiny_diffusers
    assert main(["import", str(folder), str(tmp_path / "ours")]) == 0
    dense = load_pretrained(tmp_path / "ours")
    sparse = load_pretrained(tmp_path / "ours", sparse_ratio=2, full_blocks=0)
    assert sparse.block_kinds == ["token", "group"]
    dense_params = dict(dense.named_parameters())
    assert all(torch.equal(p, dense_params[n]) for n, p in sparse.named_parameters())
    inputs = wan.random_inputs(reference, GRID)
    with torch.no_grad():
        assert sparse(*inputs).shape == dense(*inputs).shape

    half = load_pretrained(folder, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        latents, timestep, text = inputs
        expected, got = dense(*inputs), half(latents.bfloat16(), timestep, text.bfloat16())
    assert float((got.float() - expected).norm() / expected.norm()) < 0.05


def test_inspect_reports_step_dtype_and_tensor_parallel(tiny_diffusers, tmp_path, capsys):
    """inspect prints the step, TP size, dtype and parameter count of a bf16 TP=2 import."""
    reference, folder = tiny_diffusers
    assert main(["import", str(folder), str(tmp_path / "bf16"), "-t", "2", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "bf16")]) == 0
    out = capsys.readouterr().out
    count = sum(p.numel() for p in reference.parameters())
    assert "step: 0" in out and "written under: tensor=2 data=1" in out and "bfloat16" in out and f"{count:,}" in out
    assert main(["inspect", str(folder)]) == 0
    assert "diffusers layout" in capsys.readouterr().out
