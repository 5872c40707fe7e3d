"""HPS / PickScore-style reward: a CLIP model's image-text similarity, averaged over frames of the video.

Loads from a local folder only: transformers' CLIPModel (e.g. PickScore) or an open_clip checkpoint (e.g. HPS v2).
"""

import json
import os

import torch
import torch.nn.functional as F

from osp_megatron.config.errors import ConfigError
from osp_megatron.rl.rewards.base import register_reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HOW_TO_GET = (
    "put a CLIP-style reward model in a local folder: a transformers CLIPModel folder (config.json, "
    "weights, tokenizer files; e.g. PickScore_v1) for backend=transformers, or an open_clip checkpoint "
    "file (e.g. HPS v2) for backend=open_clip"
)


def sample_frames(videos: torch.Tensor, count: int) -> torch.Tensor:
    """`count` evenly spaced frames of uint8 videos [B, T, H, W, 3] -> float [B, count, 3, H, W] in [0, 1]."""
    index = torch.linspace(0, videos.shape[1] - 1, min(count, videos.shape[1])).round().long()
    return videos[:, index].permute(0, 1, 4, 2, 3).float() / 255.0


def clip_pixels(frames: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Resize the short side to `size` (bicubic, antialiased), centre-crop, normalise: CLIP's preprocessing."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    resized = F.interpolate(
        frames,
        size=(max(size, round(height * scale)), max(size, round(width * scale))),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    ).clamp(0, 1)
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size]
    return (cropped - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _projected(features):
    """The projected embeddings: transformers 4 returns them, transformers 5 as the output's pooler_output."""
    return features if torch.is_tensor(features) else features.pooler_output


class _TransformersCLIP:
    def __init__(self, path: str, device):
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False).to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot load a transformers CLIPModel and tokenizer from {path!r} ({err}); {_HOW_TO_GET}"
            ) from None
        self.image_size = self.model.config.vision_config.image_size
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        preprocessor = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(preprocessor):
            with open(preprocessor) as handle:
                settings = json.load(handle)
            self.mean, self.std = settings.get("image_mean", self.mean), settings.get("image_std", self.std)
        self.device = device

    def embed(self, pixels: torch.Tensor, prompts: list[str]):
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        image = _projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        text = _projected(self.model.get_text_features(**tokens))
        return image, text, self.model.logit_scale.exp()


class _OpenCLIP:
    def __init__(self, path: str, arch: str, device):
        try:
            import open_clip
        except ImportError:
            raise ConfigError(
                "reward clip_score with backend=open_clip needs open_clip: pip install open-clip-torch"
            ) from None
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=path, device=device)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.image_size = self.model.visual.image_size
        self.image_size = self.image_size[0] if isinstance(self.image_size, (tuple, list)) else self.image_size
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.device = device

    def embed(self, pixels: torch.Tensor, prompts: list[str]):
        image = self.model.encode_image(pixels.to(self.device))
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return image, text, self.model.logit_scale.exp()


@register_reward("clip_score")
class CLIPScoreReward:
    """scale x cosine(image, text) of a CLIP-style model, averaged over `frames` frames; `scale` "logit"
    multiplies by the model's logit scale (PickScore), a number by that number (HPS v2 uses 1)."""

    def __init__(
        self,
        path: str | None = None,
        backend: str = "transformers",
        arch: str = "ViT-H-14",
        frames: int = 4,
        scale: str | float = "logit",
        device="cpu",
    ):
        if not path or not os.path.exists(path):
            raise ConfigError(
                f"reward clip_score: weights path {path!r} does not exist; {_HOW_TO_GET}, then set "
                "its 'path' key (nothing is downloaded)"
            )
        if backend not in ("transformers", "open_clip"):
            raise ConfigError(f"reward clip_score: backend must be 'transformers' or 'open_clip', got {backend!r}")
        if frames < 1:
            raise ConfigError(f"reward clip_score: frames must be >= 1, got {frames}")
        self.model = _TransformersCLIP(path, device) if backend == "transformers" else _OpenCLIP(path, arch, device)
        self.frames, self.scale = frames, scale

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        frames = sample_frames(videos, self.frames)  # [B, F, 3, H, W]
        batch, count = frames.shape[:2]
        pixels = clip_pixels(frames.flatten(0, 1), self.model.image_size, self.model.mean, self.model.std)
        image, text, logit_scale = self.model.embed(pixels, list(prompts))
        image = F.normalize(image.float(), dim=-1).view(batch, count, -1)
        text = F.normalize(text.float(), dim=-1)
        cosine = (image * text[:, None]).sum(dim=-1).mean(dim=1)
        factor = logit_scale.float() if self.scale == "logit" else float(self.scale)
        return (factor * cosine).cpu()
