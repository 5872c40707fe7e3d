"""Helpers the tests share: tiny random models and checkpoints, and comparisons of training states.

Multi-rank tests start their ranks with osp_megatron.engine.ranks.run_on_ranks.
"""

import torch


def assert_same_training_state(path, reference_path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two checkpoints (any format, any layout) hold the same model, EMA and AdamW tensors, one by one."""
    from osp_megatron.checkpointing.offline import read_checkpoint_tensors

    for which in ("model", "ema", "optimizer"):
        tensors, expected = read_checkpoint_tensors(path, which), read_checkpoint_tensors(reference_path, which)
        assert expected and tensors.keys() == expected.keys(), (which, sorted(set(tensors) ^ set(expected))[:5])
        for name in expected:
            torch.testing.assert_close(tensors[name], expected[name], rtol=rtol, atol=atol, msg=f"{which} {name}")


def gathered_gradients(model: torch.nn.Module, world_size: int, include=lambda name: True) -> dict:
    """{name: gradient} with tensor-parallel shards all-gathered to the full tensor (collective), for comparing
    a parallel run's gradients with one rank's."""
    from osp_megatron.checkpointing.sharded import partition_dim

    grads = {}
    for name, param in model.named_parameters():
        if not include(name):
            continue
        grad, dim = param.grad, partition_dim(param)
        if dim is not None and world_size > 1:
            pieces = [torch.empty_like(grad) for _ in range(world_size)]
            torch.distributed.all_gather(pieces, grad.contiguous())
            grad = torch.cat(pieces, dim=dim)
        grads[name] = grad
    return grads


# A tiny Wan2.1 transformer: 2 heads of 12 channels (3D RoPE splits 12 as 4/4/4), 2 blocks, 4 latent channels.
TINY_DIFFUSERS_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=40,
    num_layers=2,
)


def random_diffusers_wan(seed: int = 0, **overrides):
    """diffusers' WanTransformer3DModel (TINY_DIFFUSERS_WAN + overrides) with every parameter random.

    Norm weights stay near 1 so activations keep a sensible scale; everything else, zero-initialised
    parameters included, is O(0.3), so comparisons against it exercise every weight.
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_DIFFUSERS_WAN, **overrides})
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.copy_(base + 0.3 * torch.randn_like(param))
    return model.eval()


# A tiny hybrid DiT for sampling tests: 4 blocks (full, token, group, full), 4 heads, 16x16-latent videos.
TINY_SAMPLING_MODEL = {"preset": "tiny", "sparse_ratio": 2, "num_layers": 4, "full_blocks": 1}
TINY_SAMPLING = {"num_frames": 5, "height": 64, "width": 64, "num_steps": 3, "fps": 4, "guidance_scale": 4.0}


def tiny_sampling_config(**parallel):
    """JobConfig of the tiny sampling model and settings, with `parallel` degrees."""
    from osp_megatron.config.loader import from_dict
    from osp_megatron.engine.config import JobConfig

    return from_dict(JobConfig, {"model": TINY_SAMPLING_MODEL, "sample": TINY_SAMPLING, "parallel": parallel})


def random_sampling_model(config):
    """The DiT of `config` for the current process groups (parallelized for sampling), every weight (the
    zero-initialised head too) drawn from a fixed seed, so that every rank and every layout holds the same
    nontrivial model."""
    from osp_megatron.engine.parallelize import parallelize_dit
    from osp_megatron.models.builder import build_model

    model = build_model(config.model)
    parallelize_dit(model, "inference", parallel=config.parallel)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def save_tiny_sampling_checkpoint(run_dir) -> None:
    """A complete framework checkpoint (step 1) of the tiny sampling model, with the job config osp-sample reads."""
    from osp_megatron.checkpointing.checkpoint import save_checkpoint
    from osp_megatron.config.loader import to_dict
    from osp_megatron.parallel.state import destroy_distributed, ensure_single_rank_group

    ensure_single_rank_group()
    config = tiny_sampling_config()
    save_checkpoint(
        run_dir,
        1,
        random_sampling_model(config),
        metadata={"model_config": to_dict(config.model), "config": to_dict(config)},
    )
    destroy_distributed()


def tiny_grpo_overrides(run_dir, steps: int = 2, extra=()) -> list[str]:
    """osp-grpo overrides for a run of a few seconds: 2-block model, 5 x 32 x 32 videos through the random tiny
    VAE, 4 rollout steps; torch's threads left as they are (the tests run in the test process)."""
    return [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "train.progress=false",
        "train.sample_at_end=false",
        "train.lr=1e-3",
        "train.min_lr=1e-3",
        "train.micro_batch_size=2",
        "model.num_layers=2",
        "model.vae=tiny-random",
        "checkpoint.load=null",
        "checkpoint.interval=0",
        "grpo.num_steps=4",
        "grpo.window_size=2",
        "grpo.window_mode=sliding",
        "grpo.group_size=2",
        "grpo.prompts_per_iteration=2",
        "grpo.rewards=[{name: temporal_flicker}]",
        "grpo.pretrain_if_missing=null",
        "grpo.eval_interval=0",
        "grpo.decode_batch_size=2",
        "train.cpu_threads=0",
        "prompts.synthetic=false",
        "prompts.prompts=[a red circle moving left, a blue square moving up, a green wide bar staying still]",
        "sample.num_frames=5",
        "sample.height=32",
        "sample.width=32",
        "sample.guidance_scale=2.0",
        *extra,
    ]
