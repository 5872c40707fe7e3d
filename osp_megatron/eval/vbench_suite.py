"""The VBench prompt suite and the `vbench` package: which videos to render under the names VBench expects, which
model weights each dimension reads from the cache, and VBench's own evaluation run in a (possibly other) Python.

vbench pins transformers 4.33 and numpy < 2, so it usually lives in a virtual environment of its own.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from osp_megatron.config.errors import ConfigError
from osp_megatron.eval.vbench_scores import DIMENSIONS
from osp_megatron.inference.prompts import PromptSpec

SUITE_FILE = "VBench_full_info.json"  # shipped inside the vbench package
VIDEOS_PER_PROMPT = 5  # VBench's standard suite: <prompt>-0.mp4 ... <prompt>-4.mp4
WITHOUT_WEIGHTS = ("temporal_flickering",)  # computed here, see flickering.py

# Files each dimension loads from VBENCH_CACHE_DIR (vbench 0.1.5's utils.init_submodules); when one is missing
# VBench would download it, so such dimensions are skipped with a message instead.
DIMENSION_WEIGHTS = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main", "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt",),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "object_class": ("grit_model/grit_b_densecap_objectdet.pth",),
    "multiple_objects": ("grit_model/grit_b_densecap_objectdet.pth",),
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "color": ("grit_model/grit_b_densecap_objectdet.pth",),
    "spatial_relationship": ("grit_model/grit_b_densecap_objectdet.pth",),
    "scene": ("caption_model/tag2text_swin_14m.pth",),
    "appearance_style": ("clip_model/ViT-B-32.pt",),
    "temporal_style": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
    "overall_consistency": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
    "temporal_flickering": (),
}


def check_dimensions(dimensions) -> list[str]:
    unknown = [d for d in dimensions if d not in DIMENSIONS]
    if unknown:
        raise ConfigError(f"unknown VBench dimensions {unknown}; choose from {', '.join(DIMENSIONS)}")
    return list(dimensions)


def vbench_location(python: str) -> Path | None:
    """The folder of the vbench package importable by `python`, or None."""
    if python == sys.executable:
        import importlib.util

        spec = importlib.util.find_spec("vbench")
        return Path(spec.origin).parent if spec is not None and spec.origin else None
    try:
        out = subprocess.run(
            [python, "-c", "import os, vbench; print(os.path.dirname(vbench.__file__))"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def find_suite(full_info=None, python: str = sys.executable) -> Path:
    """VBench_full_info.json: the given path, else the copy inside the vbench package `python` imports."""
    if full_info is not None:
        if not Path(full_info).is_file():
            raise ConfigError(f"--full-info {full_info!r} does not exist")
        return Path(full_info)
    package = vbench_location(python)
    if package is None or not (package / SUITE_FILE).is_file():
        raise ConfigError(
            f"the VBench prompt suite ({SUITE_FILE}) was not found: the `vbench` package is not importable by "
            f"{python}. Install it (pip install vbench, best in its own virtual environment, then pass "
            "--vbench-python ENV/bin/python) or pass --full-info PATH to the suite file"
        )
    return package / SUITE_FILE


def suite_prompts(full_info: Path, dimensions, max_prompts=None) -> list[str]:
    """The suite's prompts that serve any of `dimensions`, each once, in the suite's order; with max_prompts,
    at most that many per dimension (a quick subset)."""
    entries = json.loads(Path(full_info).read_text(encoding="utf-8"))
    chosen, per_dimension = [], {d: 0 for d in dimensions}
    for entry in entries:
        wanted = [d for d in entry["dimension"] if d in per_dimension]
        if max_prompts is not None:
            wanted = [d for d in wanted if per_dimension[d] < max_prompts]
        if wanted and entry["prompt_en"] not in chosen:
            chosen.append(entry["prompt_en"])
            for dimension in wanted:
                per_dimension[dimension] += 1
    if not chosen:
        raise ConfigError(f"{full_info} has no prompts for the dimensions {list(dimensions)}")
    return chosen


def suite_specs(prompts, videos_per_prompt: int = VIDEOS_PER_PROMPT) -> list[PromptSpec]:
    """One PromptSpec per video, named <prompt>-<index> as VBench's standard mode looks them up."""
    return [PromptSpec(prompt=prompt, name=f"{prompt}-{k}") for prompt in prompts for k in range(videos_per_prompt)]


def dimension_videos(full_info: Path, videos_dir, dimension: str) -> list[Path]:
    """The rendered videos VBench would score for `dimension` (<prompt>-<k>.mp4 of its prompts that exist)."""
    entries = json.loads(Path(full_info).read_text(encoding="utf-8"))
    videos = []
    for entry in entries:
        if dimension in entry["dimension"]:
            videos += sorted(Path(videos_dir).glob(f"{glob_escape(entry['prompt_en'])}-[0-9]*.mp4"))
    return videos


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def missing_weights(dimension: str, cache_dir) -> list[str]:
    return [
        str(Path(cache_dir) / name) for name in DIMENSION_WEIGHTS[dimension] if not (Path(cache_dir) / name).exists()
    ]


_RUN_VBENCH = """
import json, sys
import torch
from vbench import VBench
args = json.loads(sys.argv[1])
bench = VBench(torch.device(args["device"]), args["full_info"], args["output"])
bench.evaluate(videos_path=args["videos"], name=args["name"], dimension_list=args["dimensions"], local=True,
               mode="vbench_standard")
"""


def run_vbench(python: str, videos_dir, dimensions, full_info, output_dir, cache_dir, device: str, name: str) -> Path:
    """VBench's evaluation of `dimensions` over videos_dir, in `python`, reading weights from cache_dir only.

    Returns the *_eval_results.json VBench wrote; raises ConfigError with VBench's own output when it fails.
    """
    os.makedirs(output_dir, exist_ok=True)
    arguments = {
        "device": device,
        "full_info": str(full_info),
        "output": str(output_dir),
        "videos": str(videos_dir),
        "dimensions": list(dimensions),
        "name": name,
    }
    env = dict(os.environ, VBENCH_CACHE_DIR=str(cache_dir))
    done = subprocess.run([python, "-c", _RUN_VBENCH, json.dumps(arguments)], env=env, capture_output=True, text=True)
    results = Path(output_dir) / f"{name}_eval_results.json"
    if done.returncode != 0 or not results.is_file():
        raise ConfigError(
            f"VBench's evaluation of {list(dimensions)} failed (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-4000:]}"
        )
    return results
