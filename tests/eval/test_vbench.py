"""osp-eval vbench: VBench's score arithmetic against its published constants and a worked example, reading result
files, temporal flickering by definition, and the whole command on videos rendered from a tiny checkpoint.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from osp_megatron.config.errors import ConfigError
from osp_megatron.eval.cli import main
from osp_megatron.eval.flickering import frame_flicker_score
from osp_megatron.eval.vbench_scores import (
    DIMENSIONS,
    NORMALIZATION,
    QUALITY_DIMENSIONS,
    SEMANTIC_DIMENSIONS,
    WEIGHTS,
    read_results,
    vbench_report,
)

# VBench's scripts/constant.py (NORMALIZE_DIC, DIM_WEIGHT, QUALITY_LIST, SEMANTIC_LIST), with its spaced names.
PUBLISHED_MIN_MAX = {
    "subject consistency": (0.1462, 1.0),
    "background consistency": (0.2615, 1.0),
    "temporal flickering": (0.6293, 1.0),
    "motion smoothness": (0.706, 0.9975),
    "dynamic degree": (0.0, 1.0),
    "aesthetic quality": (0.0, 1.0),
    "imaging quality": (0.0, 1.0),
    "object class": (0.0, 1.0),
    "multiple objects": (0.0, 1.0),
    "human action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance style": (0.0009, 0.2855),
    "temporal style": (0.0, 0.364),
    "overall consistency": (0.0, 0.364),
}
# The worked example of docs/evaluation.md.
EXAMPLE = dict(
    subject_consistency=0.95,
    background_consistency=0.96,
    temporal_flickering=0.98,
    motion_smoothness=0.98,
    dynamic_degree=0.60,
    aesthetic_quality=0.60,
    imaging_quality=0.65,
    object_class=0.85,
    multiple_objects=0.60,
    human_action=0.95,
    color=0.85,
    spatial_relationship=0.70,
    scene=0.45,
    appearance_style=0.22,
    temporal_style=0.24,
    overall_consistency=0.26,
)


def test_constants_are_vbenchs_published_ones():
    """16 dimensions with VBench's min/max, dynamic degree weighted 0.5, 7 quality and 9 semantic dimensions."""
    assert {name.replace(" ", "_"): value for name, value in PUBLISHED_MIN_MAX.items()} == NORMALIZATION
    assert len(DIMENSIONS) == 16 and {d for d, w in WEIGHTS.items() if w != 1.0} == {"dynamic_degree"}
    assert WEIGHTS["dynamic_degree"] == 0.5
    assert len(QUALITY_DIMENSIONS) == 7 and len(SEMANTIC_DIMENSIONS) == 9
    assert set(QUALITY_DIMENSIONS) | set(SEMANTIC_DIMENSIONS) == set(DIMENSIONS)


def test_worked_example_and_bounds():
    """The documented example: e.g. subject consistency (0.95 - 0.1462) / 0.8538 = 0.9414, scene 0.45 / 0.8222 =
    0.5473; Quality = 5.3232 / 6.5 = 0.8190, Semantic = 6.6408 / 9 = 0.7379, Total = (4 Q + S) / 5 = 0.8027.
    Every dimension at its max gives 1 everywhere, at its min 0."""
    report = vbench_report(EXAMPLE)
    assert report["normalized"]["subject_consistency"] == pytest.approx(0.8038 / 0.8538)
    assert report["normalized"]["appearance_style"] == pytest.approx((0.22 - 0.0009) / (0.2855 - 0.0009))
    quality_sum = sum(report["normalized"][d] for d in QUALITY_DIMENSIONS if d != "dynamic_degree") + 0.5 * 0.6
    assert report["quality"] == pytest.approx(quality_sum / 6.5) and report["quality"] == pytest.approx(
        0.81897, abs=1e-5
    )
    assert report["semantic"] == pytest.approx(0.73787, abs=1e-5)
    assert report["total"] == pytest.approx((4 * report["quality"] + report["semantic"]) / 5)
    assert report["total"] == pytest.approx(0.80275, abs=1e-5) and report["missing"] == []
    top = vbench_report({d: high for d, (low, high) in NORMALIZATION.items()})
    bottom = vbench_report({d: low for d, (low, high) in NORMALIZATION.items()})
    assert (top["quality"], top["semantic"], top["total"]) == pytest.approx((1.0, 1.0, 1.0))
    assert (bottom["quality"], bottom["semantic"], bottom["total"]) == pytest.approx((0.0, 0.0, 0.0))


def test_incomplete_groups_are_not_scored():
    """Without all 7 quality dimensions Quality (and Total) is None, never a zero-filled number."""
    partial = {d: v for d, v in EXAMPLE.items() if d != "motion_smoothness"}
    report = vbench_report(partial)
    assert report["quality"] is None and report["total"] is None and report["missing"] == ["motion_smoothness"]
    assert report["semantic"] == pytest.approx(0.73787, abs=1e-5)


def test_result_files_vbench_layout_plain_json_and_folders(tmp_path):
    """VBench's {dim: [score, per-video]} and plain {dim: score} (spaced names too) read alike; a folder merges
    files; percentages, unknown dimensions and duplicates are refused by name."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "a_eval_results.json").write_text(json.dumps({"subject_consistency": [0.95, [{"video_path": "x"}]]}))
    (folder / "b.json").write_text(json.dumps({"temporal flickering": 0.98}))
    assert read_results(folder) == {"subject_consistency": 0.95, "temporal_flickering": 0.98}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scene": 45.0}))
    with pytest.raises(ConfigError, match="outside \\[0, 1\\].*not percent"):
        read_results(bad)
    bad.write_text(json.dumps({"sharpness": 0.5}))
    with pytest.raises(ConfigError, match="unknown VBench dimension 'sharpness'"):
        read_results(bad)
    (folder / "c.json").write_text(json.dumps({"subject_consistency": 0.9}))
    with pytest.raises(ConfigError, match="appears in two result files"):
        read_results(folder)


def test_results_only_command_prints_and_writes_scores(tmp_path, capsys):
    """osp-eval vbench --results: JSON report and TensorBoard scalars, a table on the console."""
    results = tmp_path / "all.json"
    results.write_text(json.dumps(EXAMPLE))
    assert main(["vbench", "--results", str(results), "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "vbench_scores.json").read_text())
    assert report["total"] == pytest.approx(0.80275, abs=1e-5)
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "Total score" in printed and "80.27%" in printed
    assert main(["vbench", "--output-dir", str(tmp_path / "none")]) == 2


def test_help_shows_examples(capsys):
    """osp-eval vbench --help explains the flags and ends with examples, multi-GPU and results-only included."""
    with pytest.raises(SystemExit):
        main(["vbench", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "torchrun" in text and "--results" in text and "--vbench-cache" in text


def test_flicker_score_follows_vbenchs_definition():
    """A still video scores 1; frames alternating black/white 0; a brightness ramp of 10 levels a frame 245/255."""
    still = np.full((4, 8, 8, 3), 77, dtype=np.uint8)
    assert frame_flicker_score(still) == 1.0
    blink = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)] * 2)
    assert frame_flicker_score(blink) == 0.0
    ramp = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(5)])
    assert frame_flicker_score(ramp) == pytest.approx(245 / 255)
    with pytest.raises(ConfigError, match="at least two frames"):
        frame_flicker_score(still[:1])


@pytest.mark.slow
def test_vbench_command_renders_the_suite_and_scores_temporal_flickering(tmp_path, tiny_checkpoint, capsys):
    """End to end on a tiny checkpoint and a two-prompt suite file: videos named <prompt>-<k>.mp4 alone in videos/
    (records elsewhere, as VBench's folder scan needs), temporal flickering equal to the definition applied to the
    decoded videos, the dimensions that need VBench reported as not evaluated, and a rerun renders nothing."""
    from osp_megatron.inference.video_io import read_video

    suite = tmp_path / "VBench_full_info.json"
    suite.write_text(
        json.dumps(
            [
                {"prompt_en": "In a still frame, a red cup", "dimension": ["temporal_flickering"]},
                {"prompt_en": "a dog running", "dimension": ["subject_consistency", "dynamic_degree"]},
                {"prompt_en": "a quiet lake", "dimension": ["temporal_flickering", "subject_consistency"]},
            ]
        )
    )
    out = tmp_path / "eval"
    args = [
        "vbench",
        "--checkpoint",
        str(tiny_checkpoint),
        "--full-info",
        str(suite),
        "--output-dir",
        str(out),
        "--dimensions",
        "temporal_flickering",
        "subject_consistency",
        "--videos-per-prompt",
        "2",
        "--no-progress",
        "--vbench-python",
        str(tmp_path / "no-python"),
    ]
    assert main(args) == 0
    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert videos == [
        f"{p}-{k}.mp4" for p in ("In a still frame, a red cup", "a dog running", "a quiet lake") for k in range(2)
    ]
    report = json.loads((out / "vbench_scores.json").read_text())
    flicker_videos = [
        out / "videos" / f"{p}-{k}.mp4" for p in ("In a still frame, a red cup", "a quiet lake") for k in range(2)
    ]
    expected = np.mean([frame_flicker_score(read_video(str(p)).numpy()) for p in flicker_videos])
    assert report["raw"]["temporal_flickering"] == pytest.approx(expected)
    assert report["normalized"]["temporal_flickering"] == pytest.approx((expected - 0.6293) / (1 - 0.6293))
    assert "subject_consistency" in report["missing"] and report["total"] is None
    assert any(
        "subject_consistency: not evaluated, the `vbench` package is not importable" in n for n in report["notes"]
    )
    assert len(list((out / "records").glob("*.json"))) == 6
    capsys.readouterr()
    assert main(args) == 0
    assert "6 of 6 videos are done already" in capsys.readouterr().out


def test_help_quick_example_names_a_shipped_suite_file():
    """`osp-eval vbench --help`'s quick example reads a suite file that exists in the repository and holds prompts
    for each dimension it names."""
    import re

    from osp_megatron.eval.cli import EXAMPLES
    from osp_megatron.eval.vbench_suite import find_suite, suite_prompts

    quick = EXAMPLES.split("a quick look", 1)[1].replace("\\\n", " ")
    suite = re.search(r"--full-info (\S+)", quick).group(1)
    dimensions = re.search(r"--dimensions ((?:\w+ +)+)--", quick).group(1).split()
    root = Path(__file__).resolve().parents[2]
    for dimension in dimensions:
        assert suite_prompts(find_suite(str(root / suite)), [dimension])
