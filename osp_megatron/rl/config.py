"""The `osp-grpo` job's configuration: the pretraining job's sections plus `grpo:` and `prompts:`.

Rollout videos take their size, shift, guidance and negative prompt from the `sample:` section.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import load_config
from osp_megatron.engine.config import JobConfig


@dataclass
class GRPOConfig:
    # Keys of earlier versions and where they live now.
    MOVED_KEYS: ClassVar[dict] = {"lora": "lora (a section of its own, shared with osp-train)"}

    group_size: int = 4  # G samples per prompt from one shared initial noise
    prompts_per_iteration: int = 8  # over all data-parallel ranks
    num_steps: int = 25  # T denoising steps of a rollout
    eta: float = 0.7  # SDE noise level
    window_size: int = 4  # SDE (trained) steps per rollout
    window_mode: Literal["sliding", "fixed"] = "sliding"
    window_shift_interval: int = 1  # tau: iterations between window moves
    window_stride: int = 1  # steps the window moves each time
    window_offset: int = 0  # the window's first position: a fixed window stays there, a sliding one wraps to it
    flash: bool = False  # steps after the window: second-order solver on a coarser grid
    flash_stride: int = 2  # the coarser grid takes every flash_stride-th point
    clip_range: float = 1e-4
    kl_coef: float = 0.0
    advantage_clip: float = 5.0
    # The control of a GRPO study: each iteration's rewards are shuffled over its samples (a permutation drawn
    # from train.seed and the iteration) before the advantages, so updates keep their size but carry no signal.
    # Logged rewards stay the true ones.
    shuffle_rewards: bool = False
    # Optimizer steps per iteration: the rollout batch is split into this many minibatches, the later ones
    # are slightly off-policy and the clipped ratio keeps them close.
    updates_per_iteration: int = 1
    # Every eval_interval iterations (and before the first, and at the end) the mean reward of deterministic
    # samples of eval_prompts fixed prompts with fixed noise is logged as eval_reward; 0 disables it.
    eval_interval: int = 0
    eval_prompts: int = 16
    # Draws the evaluation's prompts and noise; independent of train.seed, so runs with other seeds compare.
    eval_seed: int = 0
    # Videos per VAE decode call: batched decoding is cheaper per video, one at a time needs least memory.
    decode_batch_size: int = 1
    rewards: list[dict] = field(default_factory=lambda: [{"name": "temporal_flicker", "weight": 1.0}])
    # The last reward_ranks ranks of the world run the reward models and score the videos the policy ranks
    # send them (large reward models need no room beside the policy); 0: every policy rank scores its own.
    reward_ranks: int = 0
    # When checkpoint.load does not exist yet: run `osp-train` with this config first ("tiny": the packaged
    # tiny pretraining) so that it does. null: a missing checkpoint.load is an error.
    pretrain_if_missing: str | None = None

    def validate(self, prefix: str = "grpo") -> None:
        for key in (
            "group_size",
            "prompts_per_iteration",
            "num_steps",
            "window_size",
            "window_shift_interval",
            "window_stride",
            "flash_stride",
            "updates_per_iteration",
            "decode_batch_size",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key} must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ConfigError(f"{prefix}.group_size must be >= 2: advantages compare the samples of a group")
        if self.window_size > self.num_steps:
            raise ConfigError(f"{prefix}.window_size={self.window_size} exceeds {prefix}.num_steps={self.num_steps}")
        if not 0 <= self.window_offset <= self.num_steps - self.window_size:
            raise ConfigError(
                f"{prefix}.window_offset must be in [0, {prefix}.num_steps - {prefix}.window_size = "
                f"{self.num_steps - self.window_size}], got {self.window_offset}"
            )
        if self.eval_interval < 0 or self.eval_prompts < 1:
            raise ConfigError(f"{prefix}.eval_interval must be >= 0 and {prefix}.eval_prompts >= 1")
        if self.eta <= 0:
            raise ConfigError(f"{prefix}.eta must be > 0, got {self.eta}")
        for key in ("clip_range", "advantage_clip"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} must be > 0, got {getattr(self, key)}")
        if self.reward_ranks < 0:
            raise ConfigError(
                f"{prefix}.reward_ranks must be >= 0 (0: rewards on the policy ranks), got {self.reward_ranks}"
            )
        if self.kl_coef < 0:
            raise ConfigError(f"{prefix}.kl_coef must be >= 0, got {self.kl_coef}")
        if not self.rewards:
            raise ConfigError(f"{prefix}.rewards must list at least one reward, e.g. [{{name: temporal_flicker}}]")
        for i, reward in enumerate(self.rewards):
            if not isinstance(reward.get("name"), str):
                raise ConfigError(f"{prefix}.rewards[{i}] needs a 'name', got {reward!r}")


@dataclass
class PromptConfig:
    """Where rollout prompts come from: a text file (one per line), a JSONL file, webdataset shards with
    pre-encoded text states (latent.npy / text.npy / txt / json), inline prompts, or the synthetic captions."""

    path: str | list[str] | None = None  # file, shard folder, or list of shard globs
    format: Literal["auto", "text", "jsonl", "shards"] = "auto"
    jsonl_key: str = "prompt"  # field of each JSONL record holding the prompt
    prompts: list[str] = field(default_factory=list)  # used when path is null
    synthetic: bool = False  # every caption of the synthetic data set (osp_megatron.data.synthetic)
    max_prompts: int = 100000  # prompts read from shards are kept in memory with their text states

    def validate(self, prefix: str = "prompts") -> None:
        sources = sum([self.path is not None, bool(self.prompts), self.synthetic])
        if sources != 1:
            raise ConfigError(
                f"set exactly one of {prefix}.path, {prefix}.prompts or {prefix}.synthetic=true (got {sources})"
            )
        if self.max_prompts < 1:
            raise ConfigError(f"{prefix}.max_prompts must be >= 1")


@dataclass
class GRPOJobConfig(JobConfig):
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    prompts: PromptConfig = field(default_factory=lambda: PromptConfig(synthetic=True))

    @classmethod
    def resolve_defaults(cls, data: dict, prefix: str) -> dict:
        """train.global_batch_size is the samples of one iteration: prompts_per_iteration x group_size."""
        data = super().resolve_defaults(data, prefix)
        grpo, train = data.get("grpo") or {}, data.get("train") or {}
        if isinstance(grpo, dict) and isinstance(train, dict) and "global_batch_size" not in train:
            samples = grpo.get("prompts_per_iteration", GRPOConfig.prompts_per_iteration) * grpo.get(
                "group_size", GRPOConfig.group_size
            )
            data["train"] = dict(
                train, global_batch_size=samples, micro_batch_size=min(train.get("micro_batch_size", samples), samples)
            )
        return data

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        samples = self.grpo.prompts_per_iteration * self.grpo.group_size
        if self.train.global_batch_size != samples:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} must equal "
                f"grpo.prompts_per_iteration x grpo.group_size = {samples} (or be left out)"
            )
        if self.sample.guidance_scale < 0:
            raise ConfigError("sample.guidance_scale must be >= 0")


def load_grpo_config(path=None, overrides=None) -> GRPOJobConfig:
    return load_config(GRPOJobConfig, path, overrides)
