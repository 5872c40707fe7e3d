"""The engine every job runs on: job config, process groups, the model a job runs, optimizer, metrics, the job loop.

osp-train, osp-grpo, osp-sample and osp-eval build on it and keep only their own step (docs/engine.md).
"""
