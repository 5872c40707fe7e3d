"""Rewards: flicker, the synthetic set's verifiable colour/motion reward on rendered videos, the CLIP adapter
on a tiny random CLIP, clear messages for missing weights, and config errors naming the entry."""

import numpy as np
import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.rl.rewards import build_rewards, score_videos, to_uint8_frames


def test_temporal_flicker_prefers_steady_videos():
    still = torch.full((1, 5, 8, 8, 3), 100, dtype=torch.uint8)
    flicker = still.clone()
    flicker[0, 1::2] = 200
    scores = score_videos(build_rewards([{"name": "temporal_flicker"}]), torch.cat([still, flicker]), ["a", "b"])
    assert scores[0, 0] == 1.0 and scores[1, 0] == pytest.approx(1 - 100 / 255)


def test_uint8_frames_layout():
    video = torch.linspace(-1, 1, 2 * 3 * 4 * 2 * 2).view(2, 3, 4, 2, 2)
    frames = to_uint8_frames(video)
    assert frames.shape == (2, 4, 2, 2, 3) and frames.dtype == torch.uint8
    assert frames[0, 0, 0, 0, 0] == 0 and frames[-1, -1, -1, -1, -1] == 255


def test_synthetic_caption_reward_checks_colour_and_motion():
    """Rendered videos of the caption score high; the wrong colour or the wrong motion scores low."""
    from osp_megatron.data.synthetic import render_caption_video

    def video(colour, motion):
        return torch.from_numpy(render_caption_video(colour, "circle", motion, 9, 64, 64))

    reward = build_rewards([{"name": "synthetic_caption"}])
    videos = torch.stack(
        [
            video("red", "moving left"),
            video("blue", "moving left"),
            video("red", "moving up"),
            video("red", "staying still"),
        ]
    )
    prompt = "a red circle moving left"
    scores = score_videos(reward, videos, [prompt] * 4)[:, 0]
    assert scores[0] > 0.95
    assert scores[1] < 0.6 and scores[2] < 0.6 and scores[3] < 0.7
    still = score_videos(reward, videos[3:], ["a red circle staying still"])[0, 0]
    assert still > 0.95
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 9, 64, 64, 3), dtype=np.uint8))
    assert score_videos(reward, noise, [prompt])[0, 0] < 0.5
    with pytest.raises(ConfigError, match="not a synthetic caption"):
        score_videos(reward, videos[:1], ["a cat playing piano"])


def test_learned_rewards_say_where_weights_are_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: reward clip_score: weights path .* does not exist"):
        build_rewards([{"name": "clip_score", "path": str(tmp_path / "PickScore_v1")}])
    with pytest.raises(ConfigError, match="cannot load a transformers CLIPModel"):
        build_rewards([{"name": "clip_score", "path": str(tmp_path)}])


def test_reward_config_errors_name_the_entry():
    with pytest.raises(ConfigError, match=r"grpo.rewards\[1\].name='hps' is not a known reward"):
        build_rewards([{"name": "temporal_flicker"}, {"name": "hps"}])
    with pytest.raises(ConfigError, match=r"unknown config key 'grpo.rewards\[0\].colour'"):
        build_rewards([{"name": "temporal_flicker", "colour": "red"}])


def _tiny_clip_folder(folder):
    """A random 2-layer CLIP and a word-level tokenizer saved like a transformers checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "red", "blue", "circle", "moving", "left"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)


def test_clip_adapter_runs_on_a_tiny_random_clip(tmp_path):
    """The transformers backend loads a local CLIP folder and returns one finite score per video, which
    depends on the prompt and equals logit_scale x the cosine of the mean over frames."""
    _tiny_clip_folder(tmp_path)
    reward = build_rewards([{"name": "clip_score", "path": str(tmp_path), "frames": 2}])[0].function
    videos = torch.randint(0, 256, (2, 5, 40, 48, 3), dtype=torch.uint8)
    scores = reward(videos, ["a red circle", "a blue circle moving left"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    swapped = reward(videos, ["a blue circle moving left", "a red circle"])
    assert not torch.allclose(scores, swapped)
    plain = build_rewards([{"name": "clip_score", "path": str(tmp_path), "frames": 2, "scale": 1.0}])[0].function
    cosine = plain(videos, ["a red circle", "a blue circle moving left"])
    assert cosine.abs().max() <= 1.0
    torch.testing.assert_close(scores, cosine * reward.model.model.logit_scale.exp().item())
