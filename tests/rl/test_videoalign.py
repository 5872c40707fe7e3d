"""The VideoAlign-style reward: frame sampling and sizing rules, Qwen2-VL patch order, loading the published
checkpoint layout (PEFT LoRA folded in), the three special-token scores and clear errors."""

import json

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.rl.rewards import build_rewards
from osp_megatron.rl.rewards.videoalign import (
    REWARD_TOKENS,
    resized_size,
    sampled_frame_indices,
    video_patches,
)

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|image_pad|>",
    *REWARD_TOKENS,
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
TEMPLATE = "Rate the video for {text_prompt} . quality <|VQ_reward|> motion <|MQ_reward|> text <|TA_reward|>"
CALIBRATION = {"VQ_mean": 3.0, "VQ_std": 2.0, "MQ_mean": 1.0, "MQ_std": 1.5, "TA_mean": 2.0, "TA_std": 2.5}


def test_frame_sampling_and_sizes_follow_qwen_vl_rules():
    # 33 frames at 16 fps sampled at 2 fps: 4.1 frames, rounded to an even count >= 4.
    assert sampled_frame_indices(33, 16.0, 2.0) == [0, 11, 21, 32]
    assert sampled_frame_indices(9, 8.0, 2.0) == [0, 3, 5, 8]
    assert len(sampled_frame_indices(161, 16.0, 2.0)) == 20
    assert resized_size(128, 128, 448 * 448) == (336, 336)  # grown to the 128-token minimum
    assert resized_size(480, 832, 448 * 448) == (336, 588)  # shrunk under max_pixels, multiples of 28
    assert resized_size(448, 448, 448 * 448) == (448, 448)


def test_patch_order_matches_the_qwen2_vl_image_processor():
    """One frame (repeated to the temporal patch, as for images) gives transformers' own pixel_values and grid."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8)
    processor = Qwen2VLImageProcessorPil(do_resize=False, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    expected = processor(images=[Image.fromarray(image.numpy())], return_tensors="pt")
    flat, grid = video_patches(image.permute(2, 0, 1)[None].float(), CLIP_MEAN, CLIP_STD, 14, 2, 2)
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    torch.testing.assert_close(flat, expected["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def _tiny_videoreward(root, lora_scale=0.1):
    """A random tiny Qwen2-VL plus reward head with PEFT LoRA on the text attention, saved in VideoReward's
    published layout (transformers-4 names under PEFT's base_model.model.); returns (folder, reference model)."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    words = [
        "<unk>",
        "user",
        "assistant",
        "a",
        "red",
        "circle",
        "moving",
        "left",
        "Rate",
        "the",
        "video",
        "for",
        ".",
        "quality",
        "motion",
        "text",
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    base, checkpoint = root / "Qwen2-VL-tiny", root / "VideoReward" / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=None,
            eos_token_id=None,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(base)
    (base / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
            }
        )
    )
    model.rm_head = torch.nn.Linear(32, 1, bias=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=lora_scale)
    published = {}
    for key, value in peft_model.state_dict().items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        published[key] = value.clone()
    torch.save(published, checkpoint / "model.pth")
    tokenizer.save_pretrained(checkpoint)
    settings = {
        "data_config": {"fps": 2.0, "max_frame_pixels": 200704, "eval_dim": ["VQ", "MQ", "TA"]},
        "model_config": {
            "model_name_or_path": str(base),
            "output_dim": 1,
            "use_special_tokens": True,
            "reward_token": "special",
        },
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8},
        "inference_config": CALIBRATION,
    }
    (checkpoint.parent / "model_config.json").write_text(json.dumps(settings))
    (checkpoint.parent / "prompt_template.txt").write_text(TEMPLATE)
    return checkpoint.parent, peft_model


def test_videoalign_loads_the_published_layout_and_scores_at_the_reward_tokens(tmp_path):
    folder, reference = _tiny_videoreward(tmp_path)
    entry = {"name": "videoalign", "path": str(folder), "dimension": "overall", "batch_size": 2}
    reward = build_rewards([entry], video_fps=8.0)[0].function
    videos = torch.randint(0, 256, (3, 9, 64, 80, 3), dtype=torch.uint8)
    prompts = ["a red circle moving left", "a red circle", "a circle moving left"]
    scores = reward(videos, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()

    # The reference: the in-memory PEFT model (LoRA unmerged) on the same inputs, head read at each reward token.
    inputs = reward.prepare(videos, prompts)
    assert inputs["video_grid_thw"].tolist() == [[2, 22, 26]] * 3  # 4 frames at 2 fps; 64 x 80 grown to 308 x 364
    with torch.no_grad():
        hidden = reference.base_model.model.model(**inputs).last_hidden_state
        values = reference.base_model.model.rm_head(hidden)[..., 0]
    raw = torch.stack([values[inputs["input_ids"] == reward_id] for reward_id in reward.reward_ids], dim=1)
    mean = torch.tensor([CALIBRATION[f"{d}_mean"] for d in ("VQ", "MQ", "TA")])
    std = torch.tensor([CALIBRATION[f"{d}_std"] for d in ("VQ", "MQ", "TA")])
    torch.testing.assert_close(reward.dimensions(videos, prompts), (raw - mean) / std, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, ((raw - mean) / std).sum(dim=1), atol=1e-4, rtol=1e-4)
    single = build_rewards([dict(entry, dimension="MQ")], video_fps=8.0)[0].function
    torch.testing.assert_close(single(videos, prompts), ((raw - mean) / std)[:, 1], atol=1e-4, rtol=1e-4)
    # The LoRA matters: without folding it in, the scores differ.
    with reference.disable_adapter(), torch.no_grad():
        plain = reference.base_model.model.rm_head(reference.base_model.model.model(**inputs).last_hidden_state)
    assert not torch.allclose(plain[..., 0], values, atol=1e-4)


def test_videoalign_errors_name_the_missing_piece(tmp_path):
    with pytest.raises(ConfigError, match="path=.*is not a folder"):
        build_rewards([{"name": "videoalign", "path": str(tmp_path / "absent")}])
    with pytest.raises(ConfigError, match="model_config.json"):
        build_rewards([{"name": "videoalign", "path": str(tmp_path)}])
    folder, _ = _tiny_videoreward(tmp_path)
    with pytest.raises(ConfigError, match="dimension must be"):
        build_rewards([{"name": "videoalign", "path": str(folder), "dimension": "fun"}])
    with pytest.raises(ConfigError, match="base_model="):
        build_rewards([{"name": "videoalign", "path": str(folder), "base_model": str(tmp_path / "nowhere")}])
    with pytest.raises(ConfigError, match="unknown config key 'grpo.rewards\\[0\\].video_fps'"):
        build_rewards([{"name": "videoalign", "path": str(folder), "video_fps": 4}])
    (folder / "checkpoint-7" / "model.pth").unlink()
    with pytest.raises(ConfigError, match="checkpoint-<step>/model.pth"):
        build_rewards([{"name": "videoalign", "path": str(folder)}])
    (folder / "prompt_template.txt").unlink()
    with pytest.raises(ConfigError, match="prompt_template.txt"):
        build_rewards([{"name": "videoalign", "path": str(folder)}])
