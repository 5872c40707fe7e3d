"""VBench's score arithmetic: per-dimension min-max normalisation, then the Quality, Semantic and Total scores.

Constants from VBench's published scoring script (scripts/constant.py and scripts/cal_final_score.py of
github.com/Vchitect/VBench); docs/evaluation.md reproduces the table and a worked example.
"""

import json
from pathlib import Path

from osp_megatron.config.errors import ConfigError

# (min, max) of each dimension's raw score, as VBench normalises it: (raw - min) / (max - min).
NORMALIZATION = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
DIMENSIONS = tuple(NORMALIZATION)
QUALITY_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC_DIMENSIONS = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
WEIGHTS = {dimension: 0.5 if dimension == "dynamic_degree" else 1.0 for dimension in DIMENSIONS}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0


def normalized(dimension: str, raw: float) -> float:
    low, high = NORMALIZATION[dimension]
    return (raw - low) / (high - low)


def _weighted_mean(scores: dict, dimensions) -> float:
    return sum(WEIGHTS[d] * scores[d] for d in dimensions) / sum(WEIGHTS[d] for d in dimensions)


def vbench_report(raw: dict) -> dict:
    """Normalised dimensions and, where all their dimensions are present, Quality, Semantic and Total (0..1).

    Quality = sum(w_d n_d) / sum(w_d) over the 7 quality dimensions (dynamic degree weighs 0.5, so the
    divisor is 6.5); Semantic = mean of the 9 semantic ones; Total = (4 Quality + Semantic) / 5. A group
    with a missing dimension gets None rather than VBench's zero fill-in, and `missing` lists what is absent.
    """
    unknown = sorted(set(raw) - set(DIMENSIONS))
    if unknown:
        raise ConfigError(f"unknown VBench dimensions {unknown}; known: {', '.join(DIMENSIONS)}")
    scores = {dimension: normalized(dimension, float(value)) for dimension, value in raw.items()}
    quality = _weighted_mean(scores, QUALITY_DIMENSIONS) if set(QUALITY_DIMENSIONS) <= set(scores) else None
    semantic = _weighted_mean(scores, SEMANTIC_DIMENSIONS) if set(SEMANTIC_DIMENSIONS) <= set(scores) else None
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {
        "raw": {d: float(raw[d]) for d in DIMENSIONS if d in raw},
        "normalized": {d: scores[d] for d in DIMENSIONS if d in scores},
        "quality": quality,
        "semantic": semantic,
        "total": total,
        "missing": [d for d in DIMENSIONS if d not in raw],
    }


def _dimension_key(key: str) -> str:
    """VBench writes snake_case keys; its leaderboard tables use spaces ("subject consistency")."""
    return key.strip().lower().replace(" ", "_")


def read_results(path) -> dict:
    """{dimension: raw score} from a VBench *_eval_results.json ({dim: [score, per-video list]}), a JSON of
    {dimension: score}, or a folder of either (merged; a dimension in two files is an error)."""
    path = Path(path)
    if path.is_dir():
        merged = {}
        files = sorted(path.glob("*.json"))
        if not files:
            raise ConfigError(f"results folder {str(path)!r} holds no .json files")
        for file in files:
            for dimension, value in read_results(file).items():
                if dimension in merged:
                    raise ConfigError(f"dimension {dimension!r} appears in two result files of {str(path)!r}")
                merged[dimension] = value
        return merged
    if not path.is_file():
        raise ConfigError(f"results file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"results file {str(path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"results file {str(path)!r} must hold a JSON object of dimension -> score")
    results = {}
    for key, value in data.items():
        dimension = _dimension_key(key)
        if dimension not in NORMALIZATION:
            raise ConfigError(f"{path}: unknown VBench dimension {key!r}; known: {', '.join(DIMENSIONS)}")
        score = value[0] if isinstance(value, list) and value else value
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise ConfigError(f"{path}: {key!r} must be a number or VBench's [score, per-video results], got {value!r}")
        if not 0.0 <= score <= 1.0:
            raise ConfigError(f"{path}: {key!r} = {score} is outside [0, 1]; give VBench's raw scores (not percent)")
        results[dimension] = float(score)
    return results
