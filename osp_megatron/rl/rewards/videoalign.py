"""VideoAlign-style learned video reward: a Qwen2-VL model with a linear head scoring visual quality (VQ),
motion quality (MQ) and text alignment (TA) at three special tokens of its prompt, loaded from local folders.

Reads the published VideoReward layout (model_config.json, checkpoint-<step>/model.pth, tokenizer) on the
Qwen2-VL architecture of a local base-model folder; frames are sampled and resized as VideoAlign does.
"""

import inspect
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from osp_megatron.config.errors import ConfigError
from osp_megatron.rl.rewards.base import register_reward

DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = tuple(f"<|{name}_reward|>" for name in DIMENSIONS)
VIDEO_PAD = "<|video_pad|>"
PROMPT_TEMPLATE_FILE = "prompt_template.txt"
# Qwen2-VL's video input rules (qwen-vl-utils, which VideoAlign uses): sizes are multiples of 28 pixels (14-pixel
# patches merged 2 x 2), at least 128 merged patches per frame, frame counts even and at least 4.
SIZE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768
_HOW_TO_GET = (
    "download the VideoReward checkpoint (model_config.json, checkpoint-<step>/model.pth, tokenizer files) "
    "into a local folder for 'path', Qwen2-VL-2B-Instruct (config.json, preprocessor_config.json) into one "
    f"for 'base_model', and save VideoAlign's 'detailed_special' prompt template as {PROMPT_TEMPLATE_FILE} "
    "in 'path' (its text with {text_prompt} where the prompt goes)"
)


def sampled_frame_indices(num_frames: int, video_fps: float, sample_fps: float) -> list[int]:
    """Uniformly spaced frames at `sample_fps`: an even count between 4 and the video's length."""
    wanted = num_frames / video_fps * sample_fps
    low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
    count = round(min(max(wanted, low), high) / FRAME_FACTOR) * FRAME_FACTOR
    count = min(count, num_frames)
    if count < FRAME_FACTOR:
        raise ConfigError(f"reward videoalign needs videos of at least {FRAME_FACTOR} frames, got {num_frames}")
    return torch.linspace(0, num_frames - 1, count).round().long().tolist()


def resized_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The frame size fed to the model: multiples of 28 near the aspect ratio, within [VIDEO_MIN_PIXELS, max_pixels]."""
    rows = max(SIZE_FACTOR, round(height / SIZE_FACTOR) * SIZE_FACTOR)
    cols = max(SIZE_FACTOR, round(width / SIZE_FACTOR) * SIZE_FACTOR)
    if rows * cols > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        rows = math.floor(height / shrink / SIZE_FACTOR) * SIZE_FACTOR
        cols = math.floor(width / shrink / SIZE_FACTOR) * SIZE_FACTOR
    elif rows * cols < VIDEO_MIN_PIXELS:
        grow = math.sqrt(VIDEO_MIN_PIXELS / (height * width))
        rows = math.ceil(height * grow / SIZE_FACTOR) * SIZE_FACTOR
        cols = math.ceil(width * grow / SIZE_FACTOR) * SIZE_FACTOR
    return rows, cols


def video_patches(frames: torch.Tensor, mean, std, patch: int, temporal_patch: int, merge: int):
    """Frames [T, 3, H, W] on the 0-255 scale (sampled and sized) -> (flattened patches [t*h*w, 3*tp*p*p], grid
    (t, h, w)) in Qwen2-VL's order: the merge x merge neighbourhoods of patches are consecutive."""
    pixels = frames / 255.0
    pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if pixels.shape[0] % temporal_patch:
        repeat = temporal_patch - pixels.shape[0] % temporal_patch
        pixels = torch.cat([pixels, pixels[-1:].expand(repeat, -1, -1, -1)])
    grid = (pixels.shape[0] // temporal_patch, pixels.shape[2] // patch, pixels.shape[3] // patch)
    flat = rearrange(
        pixels,
        "(t tp) c (hm m1 p1) (wm m2 p2) -> (t hm wm m1 m2) (c tp p1 p2)",
        tp=temporal_patch,
        m1=merge,
        m2=merge,
        p1=patch,
        p2=patch,
    )
    return flat, grid


def _published_name(key: str) -> str:
    """A VideoReward state-dict key (a PEFT-wrapped Qwen2-VL of transformers 4) -> this transformers' name."""
    key = key.removeprefix("base_model.model.")
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model.") :]
    return key


def merge_lora_state(state: dict, scaling: float) -> dict:
    """Fold PEFT LoRA pairs (x.lora_A.default.weight, x.lora_B.default.weight) into x.base_layer.weight -> x.weight."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            module = key.split(".base_layer.")[0]
            key = key.replace(".base_layer.", ".")
            down = state.get(f"{module}.lora_A.default.weight")
            if down is not None and key.endswith(".weight"):
                up = state[f"{module}.lora_B.default.weight"]
                value = value + scaling * (up.float() @ down.float()).to(value.dtype)
        merged[key] = value
    return merged


def _checkpoint_folder(path: Path) -> Path:
    steps = sorted(
        (p for p in path.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if not steps or not (steps[-1] / "model.pth").is_file():
        raise ConfigError(f"reward videoalign: no checkpoint-<step>/model.pth under path={str(path)!r}; {_HOW_TO_GET}")
    return steps[-1]


def _first_with(folders, name: str):
    return next((folder for folder in folders if (folder / name).is_file()), None)


def _load_videoalign_model(base: Path, checkpoint: Path, settings: dict, device, dtype):
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    config = AutoConfig.from_pretrained(base, local_files_only=True)
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    hidden = config.text_config.hidden_size if hasattr(config, "text_config") else config.hidden_size
    head = torch.nn.Linear(hidden, settings["model_config"].get("output_dim", 1), bias=False, dtype=dtype)
    state = torch.load(checkpoint / "model.pth", map_location="cpu", weights_only=True)
    lora = settings.get("peft_lora_config") or {}
    scaling = lora.get("lora_alpha", 1) / lora.get("lora_r", 1) if lora.get("lora_enable") else 0.0
    state = {_published_name(k): v for k, v in merge_lora_state(state, scaling).items()}
    head_weight = state.pop("rm_head.weight", None)
    if head_weight is None:
        raise ConfigError(
            f"reward videoalign: {str(checkpoint / 'model.pth')!r} holds no rm_head.weight; {_HOW_TO_GET}"
        )
    # The vocabulary grew by the reward tokens: the checkpoint's embedding sizes decide.
    model.resize_token_embeddings(state["model.language_model.embed_tokens.weight"].shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or "lm_head.weight" in state]
    if missing or unexpected:
        raise ConfigError(
            f"reward videoalign: {str(checkpoint / 'model.pth')!r} does not match the Qwen2-VL of "
            f"base_model={str(base)!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    head.weight.data.copy_(head_weight)
    return model.eval().requires_grad_(False).to(device), head.eval().requires_grad_(False).to(device)


@register_reward("videoalign")
class VideoAlignReward:
    """VQ, MQ and TA of a VideoReward-style model, each normalised by the checkpoint's inference_config means and
    standard deviations; `dimension` overall (their sum, as VideoAlign reports it) or one of VQ, MQ, TA."""

    def __init__(
        self,
        path: str | None = None,
        base_model: str | None = None,
        dimension: str = "overall",
        sample_fps: float | None = None,
        max_pixels: int | None = None,
        normalise: bool = True,
        batch_size: int = 4,
        dtype: str = "auto",
        device="cpu",
        video_fps: float = 16.0,
    ):
        if not path or not os.path.isdir(path):
            raise ConfigError(
                f"reward videoalign: path={path!r} is not a folder; {_HOW_TO_GET} (nothing is downloaded)"
            )
        if dimension not in ("overall", *DIMENSIONS):
            raise ConfigError(f"reward videoalign: dimension must be overall, VQ, MQ or TA, got {dimension!r}")
        if video_fps <= 0 or batch_size < 1:
            raise ConfigError("reward videoalign: video_fps must be > 0 and batch_size >= 1")
        root = Path(path)
        if not (root / "model_config.json").is_file():
            raise ConfigError(f"reward videoalign: {str(root / 'model_config.json')!r} is missing; {_HOW_TO_GET}")
        settings = json.loads((root / "model_config.json").read_text())
        data, model_settings = settings.get("data_config") or {}, settings.get("model_config") or {}
        if not model_settings.get("use_special_tokens"):
            raise ConfigError(
                f"reward videoalign: {str(root)!r} is not a special-token VideoReward model "
                "(model_config.use_special_tokens is false)"
            )
        base = base_model or model_settings.get("model_name_or_path")
        if not base or not os.path.isfile(os.path.join(base, "config.json")):
            raise ConfigError(
                f"reward videoalign: base_model={base!r} is not a local Qwen2-VL folder with config.json; "
                "set the reward's 'base_model' key to one (e.g. Qwen2-VL-2B-Instruct)"
            )
        base = Path(base)
        template_file = root / PROMPT_TEMPLATE_FILE
        if not template_file.is_file():
            raise ConfigError(f"reward videoalign: {str(template_file)!r} is missing; {_HOW_TO_GET}")
        self.template = template_file.read_text()
        if "{text_prompt}" not in self.template or not all(token in self.template for token in REWARD_TOKENS):
            raise ConfigError(
                f"reward videoalign: {str(template_file)!r} must contain {{text_prompt}} and the "
                f"tokens {', '.join(REWARD_TOKENS)}"
            )
        checkpoint = _checkpoint_folder(root)
        tokenizer_folder = _first_with(
            [checkpoint / "tokenizer", checkpoint, root / "tokenizer", root, base], "tokenizer_config.json"
        )
        if tokenizer_folder is None:
            raise ConfigError(
                f"reward videoalign: no tokenizer (tokenizer_config.json) under {str(root)!r}; {_HOW_TO_GET}"
            )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True, padding_side="right")
        self.reward_ids = self.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        if self.tokenizer.unk_token_id in self.reward_ids:
            raise ConfigError(f"reward videoalign: the tokenizer in {str(tokenizer_folder)!r} lacks {REWARD_TOKENS}")
        self.chat_template = self.tokenizer.chat_template or self._base_chat_template(base)
        processor = (
            json.loads((base / "preprocessor_config.json").read_text())
            if (base / "preprocessor_config.json").is_file()
            else None
        )
        if processor is None:
            raise ConfigError(
                f"reward videoalign: {str(base / 'preprocessor_config.json')!r} is missing; {_HOW_TO_GET}"
            )
        self.mean, self.std = processor["image_mean"], processor["image_std"]
        self.patch, self.temporal_patch = processor.get("patch_size", 14), processor.get("temporal_patch_size", 2)
        self.merge = processor.get("merge_size", 2)
        self.sample_fps = float(sample_fps or data.get("fps") or 2.0)
        self.max_pixels = int(max_pixels or data.get("max_frame_pixels") or 448 * 448)
        self.video_fps, self.dimension, self.batch_size = float(video_fps), dimension, batch_size
        calibration = settings.get("inference_config") if normalise else None
        self.shift = torch.tensor([calibration[f"{d}_mean"] if calibration else 0.0 for d in DIMENSIONS])
        self.scale = torch.tensor([calibration[f"{d}_std"] if calibration else 1.0 for d in DIMENSIONS])
        device = torch.device(device)
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        self.device = device
        self.model, self.head = _load_videoalign_model(base, checkpoint, settings, device, getattr(torch, dtype))
        self.video_token = self.model.config.video_token_id

    @staticmethod
    def _base_chat_template(base: Path) -> str:
        for name in ("chat_template.json", "chat_template.jinja"):
            if (base / name).is_file():
                text = (base / name).read_text()
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        raise ConfigError(f"reward videoalign: neither the tokenizer nor {str(base)!r} has a chat template")

    def prepare(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        """Model inputs of uint8 videos [B, T, H, W, 3]: sampled, resized frames as patches, and the chat text with
        one video token per merged patch."""
        index = sampled_frame_indices(videos.shape[1], self.video_fps, self.sample_fps)
        rows, cols = resized_size(videos.shape[2], videos.shape[3], self.max_pixels)
        frames = videos[:, index].permute(0, 1, 4, 2, 3).flatten(0, 1).float()
        # Resized as qwen-vl-utils does (bicubic, antialiased, kept in float), then rescaled and normalised.
        frames = F.interpolate(frames, size=(rows, cols), mode="bicubic", antialias=True, align_corners=False)
        patches, grids, texts = [], [], []
        for video, prompt in zip(frames.view(len(videos), len(index), 3, rows, cols), prompts):
            flat, grid = video_patches(video, self.mean, self.std, self.patch, self.temporal_patch, self.merge)
            patches.append(flat)
            grids.append(grid)
            message = [
                {
                    "role": "user",
                    "content": [{"type": "video"}, {"type": "text", "text": self.template.format(text_prompt=prompt)}],
                }
            ]
            text = self.tokenizer.apply_chat_template(
                message, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            if text.count(VIDEO_PAD) != 1:
                raise ConfigError(f"reward videoalign: the chat template must place one {VIDEO_PAD} per video")
            tokens = grid[0] * grid[1] * grid[2] // self.merge**2
            texts.append(text.replace(VIDEO_PAD, VIDEO_PAD * tokens))
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "pixel_values_videos": torch.cat(patches),
            "video_grid_thw": torch.tensor(grids),
        }
        if "mm_token_type_ids" in inspect.signature(self.model.model.forward).parameters:
            # transformers 5 places the multimodal rotary positions by token type: 2 marks video tokens.
            inputs["mm_token_type_ids"] = (batch["input_ids"] == self.video_token).int() * 2
        return inputs

    @torch.no_grad()
    def dimensions(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Normalised [B, 3] scores (VQ, MQ, TA)."""
        scores = []
        for first in range(0, len(videos), self.batch_size):
            inputs = self.prepare(videos[first : first + self.batch_size], prompts[first : first + self.batch_size])
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.head.weight.dtype)
            hidden = self.model.model(**inputs).last_hidden_state
            values = self.head(hidden).float()[..., 0]  # [B, L]
            ids, rows = inputs["input_ids"], torch.arange(len(values), device=values.device)
            # The head's output at each reward token (VQ, MQ, TA) is that dimension's score.
            picked = torch.stack([values[rows, (ids == token).int().argmax(dim=1)] for token in self.reward_ids], dim=1)
            scores.append(picked.cpu())
        return (torch.cat(scores) - self.shift) / self.scale

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.dimensions(videos, list(prompts))
        if self.dimension == "overall":
            return scores.sum(dim=1)
        return scores[:, DIMENSIONS.index(self.dimension)]
