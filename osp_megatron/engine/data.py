"""A job's synthetic data set made with the encoders its model uses: the tiny text encoder and, for pixel videos,
the tiny block VAE (osp_megatron.data.synthetic writes the shards; this module supplies its encoders).

Also `osp-make-synthetic`, the command that writes such a set on its own (docs/data.md).
"""

import argparse
import sys
import warnings

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.synthetic import SYNTHETIC_VAES, all_captions, write_synthetic_shards


def make_synthetic_shards(
    out_dir,
    num_samples,
    samples_per_shard,
    latent_shape,
    text_len,
    text_dim,
    seed=0,
    text_encoder=None,
    vae="tiny-random",
    held_out=False,
):
    """write_synthetic_shards with the encoders a tiny model trains with: `text_encoder` (a TextEncoder; None
    builds the tiny one seeded with `seed`) and the tiny block VAE for vae="tiny-block". Returns the shards."""
    from osp_megatron.models.text_encoder import build_text_encoder
    from osp_megatron.models.vae import build_vae

    encoder_name = "given"
    if text_encoder is None:
        text_encoder = build_text_encoder(None, text_dim, text_len, seed=seed)
        encoder_name = f"tiny-umt5-words(seed={seed})"
        # The captions' token counts as the tokenizer gives them (its end token included), untruncated.
        _, mask = text_encoder.tokenizer(all_captions(), max_length=10**6)
        longest = int(mask.sum(dim=1).max())
        if longest > text_len:
            # The motion word comes last.
            warnings.warn(
                f"synthetic data: text_len={text_len} truncates captions of up to {longest} tokens, "
                "so some words will not reach the model"
            )
    video_vae = build_vae(None, tiny="tiny-block") if vae == "tiny-block" else None
    return write_synthetic_shards(
        out_dir,
        num_samples,
        samples_per_shard,
        latent_shape,
        text_len,
        text_dim,
        seed,
        text_encoder,
        encoder_name,
        vae=vae,
        video_vae=video_vae,
        held_out=held_out,
    )


def ensure_synthetic_data(config, held_out_samples=0):
    """Create config.path's synthetic data set from a DataConfig when config.synthetic is set (idempotent), and
    a held-out set of `held_out_samples` in config.eval_path when that is asked for and eval_path is set."""
    if not config.synthetic:
        return None
    if held_out_samples and isinstance(config.eval_path, str):
        make_synthetic_shards(
            config.eval_path,
            held_out_samples,
            config.synthetic_samples_per_shard,
            config.latent_shape,
            config.text_len,
            config.text_dim,
            config.synthetic_seed,
            vae=config.synthetic_vae,
            held_out=True,
        )
    return make_synthetic_shards(
        config.path,
        config.synthetic_num_samples,
        config.synthetic_samples_per_shard,
        config.latent_shape,
        config.text_len,
        config.text_dim,
        config.synthetic_seed,
        vae=config.synthetic_vae,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="osp-make-synthetic",
        description="Write a learnable synthetic data set of (latent video, text state) pairs as webdataset "
        "shards. Captions such as 'a red circle moving left' determine a moving shape, so a small DiT learns "
        "text conditioning in a few hundred CPU steps. Writes only into an empty or absent folder, or one it "
        "filled itself (marked by a .osp-synthetic file); it never overwrites other files.",
        epilog="examples:\n  osp-make-synthetic --out data/synthetic\n"
        "  osp-make-synthetic --out data/pixels --vae tiny-block --text-dim 32 --num-samples 512",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        required=True,
        help="folder to write shard-*.tar and index.json into: absent, empty, or made by this command",
    )
    parser.add_argument("--num-samples", type=int, default=1024, help="total number of samples (default 1024)")
    parser.add_argument("--samples-per-shard", type=int, default=128, help="samples per .tar shard (default 128)")
    parser.add_argument("--latent-channels", type=int, default=16, help="latent channels C (default 16, Wan VAE)")
    parser.add_argument("--latent-frames", type=int, default=3, help="latent frames T (default 3 = 9 video frames)")
    parser.add_argument("--latent-height", type=int, default=16, help="latent height H (default 16 = 128 pixels)")
    parser.add_argument("--latent-width", type=int, default=16, help="latent width W (default 16 = 128 pixels)")
    parser.add_argument("--text-len", type=int, default=32, help="maximum text tokens per caption (default 32)")
    parser.add_argument("--text-dim", type=int, default=64, help="text state width; must match the DiT (default 64)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds captions, noise and the tiny text encoder; sample with the same seed (default 0)",
    )
    parser.add_argument(
        "--text-encoder",
        default=None,
        help="local umT5 folder to encode captions with (default: the tiny random encoder)",
    )
    parser.add_argument(
        "--vae",
        default="tiny-random",
        choices=SYNTHETIC_VAES,
        help="tiny-random: analytic latent blobs (default, fast); tiny-block: pixel videos encoded "
        "by the tiny block VAE, so samples decode to real pictures",
    )
    args = parser.parse_args(argv)
    text_encoder = None
    if args.text_encoder is not None:
        from osp_megatron.models.text_encoder import build_text_encoder

        text_encoder = build_text_encoder(args.text_encoder, args.text_dim, args.text_len)
    latent_shape = (args.latent_channels, args.latent_frames, args.latent_height, args.latent_width)
    try:
        shards = make_synthetic_shards(
            args.out,
            args.num_samples,
            args.samples_per_shard,
            latent_shape,
            args.text_len,
            args.text_dim,
            args.seed,
            text_encoder,
            vae=args.vae,
        )
    except ConfigError as exc:
        print(f"osp-make-synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(f"{sum(s.num_samples for s in shards)} samples in {len(shards)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
