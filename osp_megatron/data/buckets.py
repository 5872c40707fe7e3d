"""Resolution and aspect buckets: the (height, width) sizes clips are resized and center-cropped into.

`480P`, `720P`, `768P` expand to a landscape and a portrait size; `HxW` names one size. Every clip goes to one bucket.
"""

import math
from dataclasses import dataclass

from osp_megatron.config.errors import ConfigError

# Wan2.1's training sizes (height x width, landscape); the portrait bucket swaps them.
RESOLUTION_CLASSES = {"480P": (480, 832), "720P": (720, 1280), "768P": (768, 1280)}
# VAE spatial stride 8 times the DiT patch 2: every bucket side must be a multiple of this.
SIZE_MULTIPLE = 16


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(spec: str | list[str], where: str = "--buckets") -> list[Bucket]:
    """'480P,720P' or '64x64,64x96' (or a list of such names) -> sorted unique Buckets."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    buckets = set()
    for raw in names:
        name = raw.strip()
        if name.upper() in RESOLUTION_CLASSES:
            height, width = RESOLUTION_CLASSES[name.upper()]
            buckets.update({Bucket(height, width), Bucket(width, height)})
            continue
        parts = name.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(
                f"{where}: bucket {name!r} is neither one of {sorted(RESOLUTION_CLASSES)} nor HxW (e.g. 480x832)"
            )
        height, width = int(parts[0]), int(parts[1])
        if height < SIZE_MULTIPLE or width < SIZE_MULTIPLE or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ConfigError(
                f"{where}: bucket {name!r} must have height and width that are positive multiples of "
                f"{SIZE_MULTIPLE} (VAE stride 8 x patch 2)"
            )
        buckets.add(Bucket(height, width))
    if not buckets:
        raise ConfigError(f"{where}: name at least one bucket")
    return sorted(buckets)


def choose_bucket(buckets: list[Bucket], height: int, width: int) -> Bucket:
    """The bucket a height x width video goes to: among those it covers without upscaling, the nearest aspect
    ratio (ties: the largest); when it covers none, the one needing the least upscaling (ties: nearest aspect)."""

    def aspect_distance(bucket):
        return abs(math.log(bucket.aspect) - math.log(width / height))

    def upscale(bucket):
        return max(bucket.height / height, bucket.width / width)

    fitting = [b for b in buckets if upscale(b) <= 1.0]
    if fitting:
        return min(fitting, key=lambda b: (round(aspect_distance(b), 9), -b.height * b.width))
    return min(buckets, key=lambda b: (round(upscale(b), 9), round(aspect_distance(b), 9)))


def cover_size(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
    """(scaled height, scaled width): the smallest scaling of the video that covers the bucket, aspect kept."""
    scale = max(bucket.height / height, bucket.width / width)
    return max(bucket.height, round(height * scale)), max(bucket.width, round(width * scale))


def center_crop_box(scaled_height: int, scaled_width: int, bucket: Bucket) -> tuple[int, int]:
    """(top, left) of the bucket-sized window centered in the scaled frame."""
    return (scaled_height - bucket.height) // 2, (scaled_width - bucket.width) // 2
