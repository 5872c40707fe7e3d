"""Tests of the frozen encoders: the umT5 text encoder and the Wan video VAE, tiny and loaded from disk.

Everything is built or saved locally; nothing is downloaded.
"""

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.models.text_encoder import build_text_encoder, tiny_umt5_config
from osp_megatron.models.vae import build_vae, tiny_wan_vae


def test_tiny_text_encoder_is_deterministic_and_zero_padded():
    """The same prompt gives the same states from two encoders built with one seed; padding is exactly zero."""
    prompts = ["a red circle moving left", "a  blue square"]
    first, lengths = build_text_encoder(None, 32, 40, seed=1).encode(prompts)
    second, _ = build_text_encoder(None, 32, 40, seed=1).encode(prompts)
    assert first.shape == (2, 40, 32) and first.dtype == torch.float32
    assert torch.equal(first, second)
    # one token per word plus end-of-sequence; repeated spaces are collapsed first
    assert lengths.tolist() == [6, 4]
    for states, length in zip(first, lengths):
        assert states[length:].abs().sum() == 0 and states[:length].abs().min() > 0


def test_tiny_text_encoder_states_do_not_depend_on_the_batch():
    """A prompt encoded alone or next to a longer one gives the same states (padding is masked out)."""
    encoder = build_text_encoder(None, 16, 64, seed=0)
    alone, _ = encoder.encode(["a red circle"])
    batched, _ = encoder.encode(["a red circle", "a much longer prompt about a purple tall bar moving down"])
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


def test_tiny_text_encoder_distinguishes_prompts_and_seeds():
    """Different prompts, or different seeds, give different states."""
    a, _ = build_text_encoder(None, 16, 32, seed=0).encode(["a red circle", "a blue circle"])
    b, _ = build_text_encoder(None, 16, 32, seed=1).encode(["a red circle", "a blue circle"])
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a, b)


def test_tiny_tokenizer_keeps_words_whole():
    """The tiny encoder's tokenizer gives one id per word or punctuation mark, the same id for the same word
    in any case and place, and distinct ids to every word of the synthetic captions."""
    from osp_megatron.data.synthetic import COLOURS, MOTIONS, SHAPES
    from osp_megatron.models.text_encoder import EOS_ID, WordTokenizer, word_id

    ids, mask = WordTokenizer()(["a Red circle, moving up", "red"], 16)
    assert ids[0, :7].tolist() == [
        word_id("a"),
        word_id("red"),
        word_id("circle"),
        word_id(","),
        word_id("moving"),
        word_id("up"),
        EOS_ID,
    ]
    assert ids[1, 0] == ids[0, 1] and mask.sum(1).tolist() == [7, 2]
    vocabulary = {word for phrase in (*COLOURS, *SHAPES, *MOTIONS, "a") for word in phrase.split()}
    assert len({word_id(word) for word in vocabulary}) == len(vocabulary)


def test_long_prompts_are_truncated_to_max_length():
    """A prompt longer than max_length fills exactly max_length tokens."""
    states, lengths = build_text_encoder(None, 16, 8, seed=0).encode(["x " * 100])
    assert states.shape == (1, 8, 16) and lengths.tolist() == [8]


def test_text_encoder_loads_from_a_local_folder(tmp_path):
    """A folder with config.json, weights and tokenizer files loads offline and gives padded states."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    UMT5EncoderModel(tiny_umt5_config(16)).save_pretrained(tmp_path)
    states, lengths = build_text_encoder(str(tmp_path), 16, 10).encode(["a red circle", "red"])
    assert states.shape == (2, 10, 16) and lengths.tolist() == [4, 2]
    assert states[1, 2:].abs().sum() == 0
    with pytest.raises(ConfigError, match="d_model 16.*text_dim is 32"):
        build_text_encoder(str(tmp_path), 32, 10)


def test_text_encoder_path_errors_name_the_path_and_layout(tmp_path):
    """A missing folder, or one without weights and tokenizer, names the path and the expected files."""
    with pytest.raises(ConfigError, match="nowhere.*not a directory.*config.json"):
        build_text_encoder(str(tmp_path / "nowhere"), 16, 8)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="missing files.*model weights.*tokenizer"):
        build_text_encoder(str(tmp_path), 16, 8)


def test_tiny_vae_has_wan_stride_and_channels():
    """F frames of H x W encode to 16 x (1 + (F-1)/4) x H/8 x W/8 and decode back to F x H x W in [-1, 1]."""
    vae = build_vae(None, seed=0)
    video = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, 16, 3, 2, 3) and latents.dtype == torch.float32
    assert vae.latent_shape(9, 16, 24) == (16, 3, 2, 3)
    decoded = vae.decode(latents)
    assert decoded.shape == (2, 3, 9, 16, 24) and decoded.min() >= -1 and decoded.max() <= 1
    single = vae.encode(video[:1, :, :1])
    assert single.shape == (1, 16, 1, 2, 3)


def test_vae_latents_are_normalised_with_the_config_statistics():
    """encode returns (posterior mean - latents_mean) / latents_std, and decode undoes the scaling."""
    vae = build_vae(None, seed=0)
    video = torch.rand(1, 3, 5, 8, 16) * 2 - 1
    raw = vae.autoencoder.encode(video).latent_dist.mean
    mean = torch.tensor(vae.autoencoder.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.autoencoder.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(vae.encode(video), (raw - mean) / std)
    expected = vae.autoencoder.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(vae.encode(video)), expected, atol=1e-5, rtol=1e-4)


def test_vae_rejects_incompatible_video_sizes():
    """Frame counts that are not 1 + 4k and sizes not divisible by 8 raise ConfigError saying why."""
    vae = build_vae(None)
    with pytest.raises(ConfigError, match="num_frames.*temporal stride 4"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ConfigError, match="height.*spatial stride 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))


def test_vae_loads_from_a_local_diffusers_folder(tmp_path):
    """A saved AutoencoderKLWan folder (or a model folder with vae/) loads offline with the same weights."""
    tiny_wan_vae(seed=4).save_pretrained(tmp_path / "vae")
    video = torch.rand(1, 3, 1, 8, 8) * 2 - 1
    for path in (tmp_path / "vae", tmp_path):
        torch.testing.assert_close(build_vae(str(path)).encode(video), build_vae(None, seed=4).encode(video))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty.*missing files.*config.json"):
        build_vae(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="absent.*not a directory"):
        build_vae(str(tmp_path / "absent"))
