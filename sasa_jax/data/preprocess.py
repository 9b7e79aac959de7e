"""Per-example image preprocessing on the host (NumPy + Pillow; no TensorFlow).

Images arrive as encoded bytes (JPEG or PNG, the fast path: a JPEG is decoded at a reduced
size in the DCT domain when the crop allows) or as decoded ``uint8 [h, w, 3]`` arrays. They
leave as ``uint8 [size, size, 3]``; normalisation happens on the device (``normalize``).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = Image.BILINEAR  # antialiased when downscaling


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Inception-style crop, resize and flip.

    Attributes:
      size: output side.
      area_range: fraction of the image area the crop covers, sampled uniformly.
      ratio_range: crop aspect ratio (width / height), sampled log-uniformly.
      flip: random horizontal flip.
      attempts: crop samples tried before the centre-crop fallback.
    """

    size: int
    area_range: tuple[float, float] = (0.08, 1.0)
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    attempts: int = 10

    def example(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A classification training example: ``{"image": uint8 [size, size, 3], "label":
        int32}``."""
        return {
            "image": train_image(record["image"], rng, self),
            "label": np.int32(record["label"]),
        }


def sample_crop(
    width: int, height: int, rng: np.random.Generator, area_range, ratio_range, attempts: int = 10
) -> tuple[int, int, int, int]:
    """An Inception crop box ``(left, top, crop_width, crop_height)`` inside the image.

    Tries ``attempts`` boxes with area fraction in ``area_range`` and aspect ratio in
    ``ratio_range``; if none fits, falls back to the largest centred box whose aspect ratio is
    clipped into ``ratio_range``.
    """
    area = width * height
    log_ratio = (math.log(ratio_range[0]), math.log(ratio_range[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*area_range)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    ratio = width / height
    if ratio < ratio_range[0]:
        w, h = width, int(round(width / ratio_range[0]))
    elif ratio > ratio_range[1]:
        w, h = int(round(height * ratio_range[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def centre_crop(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    """The centred square box of side ``fraction * min(width, height)``."""
    side = max(1, int(round(fraction * min(width, height))))
    return (width - side) // 2, (height - side) // 2, side, side


def _open(image) -> Image.Image:
    if isinstance(image, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(image))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def crop_and_resize(image, box_fn, size: int, flip: bool = False) -> np.ndarray:
    """Decodes ``image``, crops ``box_fn(width, height)`` and resizes it to ``size x size``.

    For a JPEG, the decoder downscales by 2, 4 or 8 in the DCT domain as long as the crop
    stays at least ``size`` pixels on each side, so large images decode cheaply.
    """
    img = _open(image)
    width, height = img.size
    left, top, w, h = box_fn(width, height)
    if img.format == "JPEG":
        scale = 1
        while scale < 8 and min(w, h) // (2 * scale) >= size:
            scale *= 2
        if scale > 1:
            img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / width, img.size[1] / height
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = img.resize((size, size), RESAMPLE, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def train_image(image, rng: np.random.Generator, augment: TrainAugment) -> np.ndarray:
    """Inception crop, resize to ``augment.size``, random flip: ``uint8 [size, size, 3]``."""

    def box(width, height):
        return sample_crop(
            width, height, rng, augment.area_range, augment.ratio_range, augment.attempts
        )

    flip = augment.flip and rng.random() < 0.5
    return crop_and_resize(image, box, augment.size, flip=flip)


def eval_image(image, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """The centred ``crop_fraction`` of the shorter side, resized to ``size``: ``uint8``."""
    return crop_and_resize(image, lambda w, h: centre_crop(w, h, crop_fraction), size)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=None):
    """``uint8 [..., 3]`` -> ``(x/255 - mean) / std``; runs on the device inside the step.

    Works on NumPy and JAX arrays alike (``dtype`` defaults to float32).
    """
    import jax.numpy as jnp

    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype or jnp.float32)
