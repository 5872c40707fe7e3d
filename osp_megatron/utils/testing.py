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


def _worker(rank, world_size, port, path, name, args, queue):
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

    `fn` must be a module-level function. Processes are spawned, not forked: a forked child would inherit the
    parent's torch.distributed state (tests that build models in-process initialise a group), and tearing that
    down in the child crashes.
    """
    if "<locals>" in fn.__qualname__:
        raise ValueError(f"run_on_ranks needs a module-level function, got {fn.__qualname__}")
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    path = inspect.getfile(fn)
    processes = [context.Process(target=_worker, args=(r, world_size, port, path, fn.__name__, args, queue))
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
