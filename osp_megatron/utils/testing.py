"""Run a function on several fresh CPU ranks (gloo) inside one test, and collect what each rank returns.

Used by the distributed tests: every parallel layout is checked against a single-rank run this way.
"""

import importlib.util
import inspect
import os
import pickle
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_function(path: str, name: str):
    """Import a module-level function from its source file (works for pytest's importlib-mode test modules)."""
    spec = importlib.util.spec_from_file_location(f"_osp_rank_module_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


# What every rank imports: the fork server imports it once, then each rank starts in a fraction of a second instead
# of spending seconds importing torch, megatron-core, transformers and diffusers anew.
_PRELOAD = ["osp_megatron.training.trainer", "osp_megatron.inference.runner", "osp_megatron.rl.trainer", "diffusers"]


def _worker(rank, world_size, port, path, name, args, queue, environ, cwd):
    # A rank forked from the server starts with the server's environment and folder: take the caller's, as a
    # spawned process would.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensors into the message; the queue's own pickler would share their memory,
        # which breaks once this process exits before the parent has read them.
        fn = _load_function(path, name)
        result = pickle.dumps(fn(rank, world_size, *args))
        queue.put((rank, "ok", result))
    except BaseException:  # report the failure to the parent instead of hanging the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from osp_megatron.parallel.state import destroy_distributed

        destroy_distributed()


def run_on_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) on `world_size` fresh processes; returns results in rank order.

    `fn` must be a module-level function. Processes come from a fork server (started on first use, with the
    modules of _PRELOAD imported), not from forking this process: a child of this one would inherit its
    torch.distributed state (tests that build models in-process initialise a group), and tearing that down in
    the child crashes. Each rank gets this process's environment and working folder.
    """
    if "<locals>" in fn.__qualname__:
        raise ValueError(f"run_on_ranks needs a module-level function, got {fn.__qualname__}")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    queue = context.Queue()
    port = free_port()
    path = inspect.getfile(fn)
    environ, cwd = dict(os.environ), os.getcwd()
    processes = [context.Process(target=_worker,
                                 args=(r, world_size, port, path, fn.__name__, args, queue, environ, cwd))
                 for r in range(world_size)]
    for process in processes:
        process.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for process in processes:
            process.join(timeout=5 if errors else timeout)
            if process.is_alive():
                process.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


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
TINY_DIFFUSERS_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                          out_channels=4, text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2)


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
    from osp_megatron.config.job import JobConfig
    from osp_megatron.config.loader import from_dict

    return from_dict(JobConfig, {"model": TINY_SAMPLING_MODEL, "sample": TINY_SAMPLING, "parallel": parallel})


def random_sampling_model(config):
    """The DiT of `config` for the current process groups, every weight (the zero-initialised head too) drawn
    from a fixed seed, so that every rank and every layout holds the same nontrivial model."""
    from osp_megatron.models.builder import build_model

    model = build_model(config.model)
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
    save_checkpoint(run_dir, 1, random_sampling_model(config),
                    metadata={"model_config": to_dict(config.model), "config": to_dict(config)})
    destroy_distributed()
