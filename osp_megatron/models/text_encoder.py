"""Frozen umT5 text encoder: prompts -> zero-padded token states, as Wan2.1 conditions its DiT.

Loads a local umT5 checkpoint, or builds a tiny random-weight one with a word-hashing tokenizer for tests
and the CPU examples.
"""

import os
import re
import zlib

import torch
import transformers
from transformers import UMT5Config, UMT5EncoderModel

from osp_megatron.config.errors import ConfigError

PAD_ID = 0
EOS_ID = 1
BYTE_OFFSET = 3  # ids 0..2 are pad, eos and unk, as in the T5 family
TINY_VOCAB_SIZE = 320

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
_EXPECTED_LAYOUT = (
    "a directory with config.json, model weights (model.safetensors[.index.json] or pytorch_model.bin) "
    "and tokenizer files (tokenizer.json or spiece.model), or a diffusers model folder holding them in "
    "text_encoder/ and tokenizer/"
)


def clean_prompt(prompt):
    """Collapse runs of whitespace so that cosmetic spacing never changes the conditioning."""
    return re.sub(r"\s+", " ", prompt).strip()


def _padded(rows):
    """(input_ids [B, N], attention_mask [B, N]) of token id lists, N = the longest, padded with PAD_ID."""
    longest = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids, mask


class ByteTokenizer:
    """Deterministic tokenizer over UTF-8 bytes; needs no vocabulary file (benchmarks of long prompts)."""

    def __call__(self, prompts, max_length):
        """Return (input_ids [B, N], attention_mask [B, N]) with N = longest prompt, ending in EOS."""
        return _padded(
            [[byte + BYTE_OFFSET for byte in prompt.encode("utf-8")][: max_length - 1] + [EOS_ID] for prompt in prompts]
        )


class WordTokenizer:
    """Deterministic tokenizer of the tiny umT5: one token per word or punctuation mark, its id a hash of the
    word (CRC-32 into the tiny vocabulary), so it needs no vocabulary file and tests run offline. Like umT5's
    SentencePiece, which keeps common words whole, a caption's words reach the model as single tokens."""

    def __call__(self, prompts, max_length):
        """Return (input_ids [B, N], attention_mask [B, N]) with N = longest prompt, ending in EOS."""
        return _padded(
            [
                [word_id(word) for word in re.findall(r"\w+|[^\w\s]", prompt)][: max_length - 1] + [EOS_ID]
                for prompt in prompts
            ]
        )


def word_id(word: str) -> int:
    """The tiny vocabulary's id of a word (case-folded): BYTE_OFFSET .. TINY_VOCAB_SIZE - 1."""
    return BYTE_OFFSET + zlib.crc32(word.lower().encode("utf-8")) % (TINY_VOCAB_SIZE - BYTE_OFFSET)


class _HuggingFaceTokenizer:
    """Adapts a transformers tokenizer to the (ids, mask) interface of ByteTokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, prompts, max_length):
        out = self.tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=max_length,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]


class TextEncoder:
    """A frozen umT5 encoder: `encode(prompts)` gives states zero-padded to `max_length`."""

    def __init__(self, model, tokenizer, max_length, device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_dim = model.config.d_model
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompts):
        """prompts: list of B strings -> (states [B, max_length, text_dim] float32, lengths [B] long).

        Positions at and after each prompt's length are exactly zero, as the DiT expects.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [clean_prompt(p) for p in prompts]
        input_ids, mask = self.tokenizer(prompts, self.max_length)
        input_ids, mask = input_ids[:, : self.max_length], mask[:, : self.max_length]
        # Encoding only up to the longest prompt is exact (padding is masked out) and much cheaper than 512.
        hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        hidden = hidden.float().cpu() * mask[..., None].float()
        states = torch.zeros(len(prompts), self.max_length, self.text_dim)
        states[:, : hidden.shape[1]] = hidden
        return states, mask.sum(dim=1)

    def to(self, device):
        self.model.to(device)
        self.device = torch.device(device)
        return self


def tiny_umt5_config(text_dim):
    """A 2-layer umT5 with d_model = text_dim that runs in milliseconds on CPU."""
    num_heads = 4 if text_dim % 4 == 0 else 1
    return UMT5Config(
        vocab_size=TINY_VOCAB_SIZE,
        d_model=text_dim,
        d_kv=text_dim // num_heads,
        d_ff=2 * text_dim,
        num_layers=2,
        num_heads=num_heads,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )


def _find_checkpoint_dirs(path):
    """Return (model_dir, tokenizer_dir) for a plain or diffusers-style layout, or None when incomplete."""
    candidates = [(path, path), (os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer"))]
    for model_dir, tokenizer_dir in candidates:
        has_config = os.path.isfile(os.path.join(model_dir, "config.json"))
        has_weights = any(os.path.isfile(os.path.join(model_dir, name)) for name in _WEIGHT_FILES)
        has_tokenizer = any(os.path.isfile(os.path.join(tokenizer_dir, name)) for name in _TOKENIZER_FILES)
        if has_config and has_weights and has_tokenizer:
            return model_dir, tokenizer_dir
    return None


def build_text_encoder(path, text_dim, max_length, seed=0, device="cpu", dtype=torch.float32):
    """Load umT5 from the local directory `path`, or build a tiny random one (deterministic from seed).

    The loaded model must have d_model == text_dim; nothing is ever downloaded.
    """
    if max_length < 1:
        raise ConfigError(f"text encoder max_length must be a positive integer, got {max_length}")
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(tiny_umt5_config(text_dim))
        return TextEncoder(model, WordTokenizer(), max_length, device)

    if not os.path.isdir(path):
        raise ConfigError(f"text encoder path {path!r} is not a directory; expected {_EXPECTED_LAYOUT}")
    dirs = _find_checkpoint_dirs(path)
    if dirs is None:
        raise ConfigError(f"text encoder path {path!r} is missing files; expected {_EXPECTED_LAYOUT}")
    model_dir, tokenizer_dir = dirs
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, **{dtype_key: dtype})
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the umT5 text encoder from {path!r} ({exc}); expected {_EXPECTED_LAYOUT}"
        ) from exc
    if model.config.d_model != text_dim:
        raise ConfigError(
            f"text encoder at {path!r} has d_model {model.config.d_model}, but text_dim is {text_dim}; "
            "set the model's text_dim to match the checkpoint"
        )
    return TextEncoder(model, _HuggingFaceTokenizer(tokenizer), max_length, device)
