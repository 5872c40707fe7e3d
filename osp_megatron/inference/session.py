"""A sampling session: process groups, the DiT with its weights, the encoders and this rank's share of the work.

osp-sample renders its prompt list with it; osp-eval renders the VBench suite with it.
"""

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from osp_megatron.engine.config import JobConfig
from osp_megatron.inference.generate import generate_videos
from osp_megatron.inference.jobs import plan_jobs
from osp_megatron.inference.loading import load_sampling_model, resolve_weights, sampling_config
from osp_megatron.inference.pipeline import TextToVideoPipeline
from osp_megatron.inference.prompts import PromptSpec, read_prompt_file
from osp_megatron.inference.replicas import SamplingLayout


@dataclass
class SamplingSession:
    config: JobConfig
    weights: Path
    which: str
    pipeline: TextToVideoPipeline
    layout: SamplingLayout

    @classmethod
    def open(
        cls, checkpoint: str, config_path=None, overrides=(), which: str = "ema", settings=None, job: str = "osp-sample"
    ):
        """Resolve the weights, build the config, start the process groups, load the model and the encoders."""
        from osp_megatron.checkpointing.metadata import is_complete
        from osp_megatron.checkpointing.offline import stored_kinds
        from osp_megatron.inference.replicas import build_sampling_layout
        from osp_megatron.inference.runner import build_pipeline
        from osp_megatron.parallel.state import init_distributed

        weights = resolve_weights(checkpoint)
        config = sampling_config(weights, config_path, overrides, settings, job)
        config.sample.validate()
        which = which if is_complete(weights) and which in stored_kinds(weights) else "model"
        device = init_distributed(config.parallel)
        layout = build_sampling_layout(config.sample.cfg_parallel)
        model = load_sampling_model(config, weights, which, device)
        return cls(config, weights, which, build_pipeline(model, config, device), layout)

    @property
    def logging_rank(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    @property
    def weights_label(self) -> str:
        """How records name the weights: path plus which copy (a rerun must use the same to count as done)."""
        return f"{self.weights.resolve()}:{self.which}"

    def prompt_specs(self) -> list[PromptSpec]:
        sample = self.config.sample
        if sample.prompt_file is not None:
            return read_prompt_file(sample.prompt_file)
        return [PromptSpec(prompt=prompt) for prompt in sample.prompts]

    def jobs(self):
        """The run's videos: the prompt file's or sample.prompt's, named as sample.output_dir / sample.output say."""
        return plan_jobs(self.prompt_specs(), self.config.sample, self.config.sample.output_dir)

    def render(self, jobs, log_dir=None, progress: bool = True):
        """Render the jobs that have no record yet; returns (rendered by this replica, skipped as done).

        Throughput lines go to log_dir/metrics.jsonl and log_dir/tensorboard (default: sample.output_dir, if set).
        """
        sample = self.config.sample
        log_dir = log_dir or sample.output_dir
        return generate_videos(self.pipeline, jobs, sample, self.layout, self.weights_label, log_dir, progress)

    def close(self) -> None:
        from osp_megatron.parallel.state import destroy_distributed

        if dist.is_initialized():
            dist.barrier()
        destroy_distributed()
