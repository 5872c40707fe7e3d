"""osp-launch: run a job (osp-train, osp-grpo, osp-sample, osp-data encode) on Slurm or under torchrun here.

`launch.cli` parses the command line, `launch.slurm` builds the submission, `launch.task` runs inside it.
"""
