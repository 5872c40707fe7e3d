"""Run a function on several fresh CPU ranks (gloo) and collect what each rank returns.

Used by the offline checkpoint transforms (resharding on CPU ranks) and by the distributed tests.
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
_PRELOAD = [
    "osp_megatron.engine.model",
    "osp_megatron.engine.loop",
    "osp_megatron.training.cli",
    "osp_megatron.training.trainer",
    "osp_megatron.rl.cli",
    "osp_megatron.rl.trainer",
    "osp_megatron.inference.runner",
    "transformers",
    "diffusers",
]


def _worker(rank, world_size, port, path, name, args, queue, environ, cwd):
    # A rank forked from the server starts with the server's environment and folder: take the caller's, as a
    # spawned process would.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
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
    processes = [
        context.Process(target=_worker, args=(r, world_size, port, path, fn.__name__, args, queue, environ, cwd))
        for r in range(world_size)
    ]
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
