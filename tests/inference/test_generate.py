"""osp-sample over prompt lists: prompt files, file names and seeds, records, resume after a kill, several ranks.

A tiny random-weight hybrid DiT checkpoint (utils.testing) keeps each video well under a second of compute.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.sample_config import SampleConfig
from osp_megatron.inference.cli import build_parser, main
from osp_megatron.inference.jobs import plan_jobs
from osp_megatron.inference.prompts import PromptSpec, read_prompt_file
from osp_megatron.testing import random_sampling_model, tiny_sampling_config

ROOT = Path(__file__).resolve().parents[2]


def test_prompt_files_give_specs_and_name_bad_lines(tmp_path):
    """.txt: one prompt a line; .jsonl: per-prompt settings; an unknown key or bad JSON names file and line."""
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  a blue square  \n")
    assert [s.prompt for s in read_prompt_file(text)] == ["a red circle", "a blue square"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a cat", "seed": 7, "height": 32, "name": "cat"}\n\n{"prompt": "a dog"}\n')
    assert read_prompt_file(lines) == [PromptSpec("a cat", seed=7, height=32, name="cat"), PromptSpec("a dog")]
    lines.write_text('{"prompt": "a cat", "colour": "red"}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:1: unknown keys \['colour'\]"):
        read_prompt_file(lines)
    lines.write_text('{"prompt": "a cat"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match=r"p.jsonl:2: not valid JSON"):
        read_prompt_file(lines)
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


def test_plan_names_seeds_and_sizes():
    """In a folder: <index>-<slug>[-k] or the prompt's name; seeds from the run seed, or the prompt's own + k;
    per-prompt sizes override the run's; colliding names are refused."""
    sample = SampleConfig(seed=10, videos_per_prompt=2, output="o/x.mp4")
    specs = [PromptSpec("A Red circle!"), PromptSpec("dog", seed=3, num_frames=9, name="dog")]
    jobs = plan_jobs(specs, sample, "out")
    assert [Path(j.video).name for j in jobs] == [
        "00000-a_red_circle-0.mp4",
        "00000-a_red_circle-1.mp4",
        "dog-0.mp4",
        "dog-1.mp4",
    ]
    assert [j.seed for j in jobs] == [10, 11, 3, 4] and [j.num_frames for j in jobs] == [81, 81, 9, 9]
    assert jobs[0].record == "out/00000-a_red_circle-0.json" and jobs[0].strip == "out/00000-a_red_circle-0.png"
    single = plan_jobs([PromptSpec("x")], SampleConfig(output="o/x.mp4"))
    assert single[0].video == "o/x.mp4" and single[0].record == "o/x.json"
    with pytest.raises(ConfigError, match="share a file name"):
        plan_jobs([PromptSpec("a", name="same"), PromptSpec("b", name="same")], SampleConfig(), "out")


def test_example_configs_and_prompt_files_load():
    """examples/sample_*.yaml are valid job configs and examples/prompts/* valid prompt files."""
    from osp_megatron.config.loader import from_dict, load_yaml
    from osp_megatron.engine.config import JobConfig

    for path in sorted((ROOT / "examples").glob("sample_*.yaml")):
        from_dict(JobConfig, load_yaml(path)).sample.validate()
    assert len(read_prompt_file(ROOT / "examples" / "prompts" / "tiny.txt")) == 4
    specs = read_prompt_file(ROOT / "examples" / "prompts" / "wan_demo.jsonl")
    assert len(specs) == 4 and specs[1].name == "mountain-sunrise"


def test_help_shows_examples():
    """--help documents every flag and ends with runnable examples, multi-GPU included."""
    text = build_parser().format_help()
    assert "examples:" in text and "torchrun" in text and "--prompt-file" in text and "--cfg-parallel" in text


def _records(folder):
    return sorted(p for p in Path(folder).glob("*.json"))


def test_prompt_file_writes_records_and_a_rerun_renders_only_what_is_missing(tiny_checkpoint, tmp_path):
    """Each video gets an .mp4, a .png strip, a .json record (prompt, seed, settings) and, with --frames, its
    frames as PNGs; a rerun after a
    crash (one record gone, a stale partial file left) renders just that video and cleans the partial file; a
    rerun with other settings stops with an error instead of mixing videos."""
    from osp_megatron.inference.video_io import read_video

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green bar\n")
    out = tmp_path / "out"
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--prompt-file",
        str(prompts),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--no-progress",
        "--seed",
        "5",
    ]
    assert main(args + ["--frames"]) == 0
    records = _records(out)
    assert len(records) == 3 and len(list(out.glob("*.png"))) == 3
    assert len(list((out / "00002-a_green_bar_frames").glob("*.png"))) == 5
    first = json.loads(records[0].read_text())
    assert first["settings"]["prompt"] == "a red circle" and first["settings"]["seed"] == 5
    assert first["settings"]["sampler"] == "unipc" and first["settings"]["num_steps"] == 3
    assert read_video(str(out / first["video"])).shape == (5, 64, 64, 3)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["sample/videos_per_s"] > 0

    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    records[1].unlink()
    (out / ".00001-a_blue_square.mp4.tmp-999").write_bytes(b"partial")
    time.sleep(0.01)
    assert main(args) == 0
    redone = [name for name, stamp in kept.items() if (out / name).stat().st_mtime_ns != stamp]
    assert redone == ["00001-a_blue_square.mp4"] and len(_records(out)) == 3
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert main(args + ["--steps", "4"]) == 2


def _rank_latents(rank, world):
    """One batch of two videos on this rank under three layouts of the same two ranks: ssp (each video over both
    ranks' SSP = 2), cfg (guidance halves on different ranks), plain (each rank alone, both halves batched)."""
    from osp_megatron.inference.replicas import build_sampling_layout
    from osp_megatron.inference.runner import build_pipeline
    from osp_megatron.parallel.state import destroy_model_parallel, init_distributed

    results = {}
    for phase in ("ssp", "cfg", "plain"):
        config = tiny_sampling_config(ssp=2 if phase == "ssp" else 1)
        device = init_distributed(config.parallel)
        layout = build_sampling_layout(cfg_parallel=phase == "cfg")
        pipeline = build_pipeline(random_sampling_model(config), config, device)
        sample = config.sample
        latents = pipeline.sample_latents(
            ["a red circle", "a blue square"],
            ["blurry", ""],
            [3, 4],
            sample.num_frames,
            sample.height,
            sample.width,
            sample.num_steps,
            sample.shift,
            sample.guidance_scale,
            "unipc",
            cfg_group=layout.cfg_group,
        )
        results[phase] = (latents, layout.writer, layout.replicas)
        destroy_model_parallel()
    return results


@pytest.mark.slow
def test_sequence_and_cfg_parallel_sampling_equal_one_rank():
    """Two gloo ranks, hybrid Skiparse model: one video over SSP = 2, or its conditional and unconditional passes
    on different ranks (one exchange per step), give the single-rank latents, equal on both ranks; in each
    layout the two ranks form one model replica and only one of them writes."""
    from osp_megatron.engine.ranks import run_on_ranks

    first, second = run_on_ranks(_rank_latents, 2, timeout=600)
    reference = first["plain"][0]
    assert torch.equal(reference, second["plain"][0]) and first["plain"][2] == 2
    for phase in ("ssp", "cfg"):
        latents, writes, replicas = first[phase]
        assert torch.equal(latents, second[phase][0]) and (writes, second[phase][1], replicas) == (True, False, 1)
        torch.testing.assert_close(latents, reference, atol=2e-5, rtol=1e-5)


def _torchrun(args):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "osp_megatron.inference.cli",
        *args,
    ]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port():
    from osp_megatron.engine.ranks import free_port

    return free_port()


@pytest.mark.slow
def test_prompt_file_over_two_ranks_resumes_after_a_kill(tiny_checkpoint, tmp_path):
    """torchrun, 2 data-parallel ranks, 8 prompts: SIGKILL every process once some videos are done; the rerun
    renders only the videos without a record, and every prompt ends with exactly one complete video."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"shape number {i} moving\n" for i in range(8)))
    out = tmp_path / "out"
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--prompt-file",
        str(prompts),
        "--output-dir",
        str(out),
        "--no-progress",
        "sample.num_steps=6",
    ]
    job = _torchrun(args)
    deadline = time.time() + 240
    while len(_records(out)) < 2 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: kill each process of the job, as Slurm would.
    for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
        process.kill()
    job.wait(timeout=30)
    done_before = {p.stem: p.stat().st_mtime_ns for p in _records(out)}
    assert 2 <= len(done_before) < 8, "the job must be killed midway"

    rerun = _torchrun(args)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    assert f"{len(done_before)} of 8 videos are done already" in output
    records = _records(out)
    assert len(records) == 8 and len(list(out.glob("*.mp4"))) == 8
    assert all(p.stat().st_mtime_ns == done_before[p.stem] for p in records if p.stem in done_before)
    seeds = sorted(json.loads(p.read_text())["settings"]["seed"] for p in records)
    assert seeds == list(range(8))
