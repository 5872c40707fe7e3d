"""A checkpoint of a preset's DiT with random weights, written the way a job writes one, for timing the real entry
points (osp-grpo with LoRA on a base, osp-sample) at published sizes where no published weights are at hand.

Example: python benchmarks/make_random_checkpoint.py --preset wan-14b --dtype bfloat16 --out /tmp/wan14b_random
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import random_model  # noqa: E402

from osp_megatron.checkpointing.checkpoint import save_checkpoint  # noqa: E402
from osp_megatron.config.loader import from_dict, to_dict  # noqa: E402
from osp_megatron.engine.config import JobConfig  # noqa: E402
from osp_megatron.parallel.state import destroy_distributed, ensure_single_rank_group  # noqa: E402
from osp_megatron.utils.logging import quiet_third_party_warnings  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan-1.3b", help="model.preset (default wan-1.3b)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="further model settings, e.g. model.sparse_ratio=2 (repeatable)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--out", required=True, help="run folder to write checkpoints/step_00000000 into")
    args = parser.parse_args(argv)
    quiet_third_party_warnings()
    ensure_single_rank_group()
    data = {"model": {"preset": args.preset, "params_dtype": args.dtype}}
    for item in args.sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = int(value) if value.isdigit() else value
    config = from_dict(JobConfig, data)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    started = time.perf_counter()
    model = random_model(config.model, device, getattr(torch, args.dtype))
    built = time.perf_counter()
    path = save_checkpoint(
        args.out, 0, model, metadata={"model_config": to_dict(config.model), "config": to_dict(config)}
    )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {args.dtype}) built in "
        f"{built - started:.1f} s, written to {path} in {time.perf_counter() - built:.1f} s ({size / 2**30:.1f} GiB)"
    )
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
