"""osp-launch: run a job (osp-train, osp-grpo, osp-sample, osp-data encode) on Slurm or under torchrun here.

`osp_launch.cli` parses the command line, `osp_launch.slurm` builds the submission, `osp_launch.task` runs inside it.
"""
