"""Evaluation of trained models: VBench's prompt suite, dimension scores and the Quality / Semantic / Total scores.

`osp-eval` (cli.py) renders the suite with osp-sample's machinery and scores it (docs/evaluation.md).
"""
