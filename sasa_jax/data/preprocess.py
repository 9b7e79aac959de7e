"""Per-example image preprocessing on the host (NumPy + OpenCV; no TensorFlow).

Images arrive as encoded bytes (JPEG, PNG or anything else OpenCV or Pillow reads) or as
decoded ``uint8 [h, w(, c)]`` arrays, and leave as ``uint8 [size, size, 3]``; normalisation
happens on the device (``normalize``). The crop is drawn from the image's size before
decoding, so a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain whenever the crop
stays at least ``size`` pixels a side. OpenCV's decode (libjpeg-turbo) and bilinear resize run
without the GIL, so decoding threads use every core.
"""

from __future__ import annotations

import dataclasses
import io
import math

import cv2
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = cv2.INTER_LINEAR  # bilinear; antialiasing is left to the JPEG's DCT reduction


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Inception-style crop, resize and flip.

    Attributes:
      size: output side.
      area_range: fraction of the image area the crop covers, sampled uniformly.
      ratio_range: crop aspect ratio (width / height), sampled log-uniformly.
      flip: random horizontal flip.
      attempts: crop samples tried before the centre-crop fallback.
      translate: after the crop, a shift of up to this many whole pixels along each axis
        (uniform, the vacated pixels black, no resampling); 0: none.
    """

    size: int
    area_range: tuple[float, float] = (0.08, 1.0)
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    attempts: int = 10
    translate: int = 0

    def example(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A classification training example: ``{"image": uint8 [size, size, 3], "label":
        int32}``."""
        return {
            "image": train_image(record["image"], rng, self),
            "label": np.int32(record["label"]),
        }

    def empty(self) -> dict[str, np.ndarray]:
        """An example of the training batch's shapes and dtypes (zeros)."""
        return {"image": np.zeros((self.size, self.size, 3), np.uint8), "label": np.int32(0)}


@dataclasses.dataclass(frozen=True)
class ClassificationEval:
    """The classification eval example: a centre crop, the label and ``mask``."""

    size: int
    crop_fraction: float = 0.875

    def __call__(self, index: int, record: dict) -> dict[str, np.ndarray]:
        del index
        return {
            "image": eval_image(record["image"], self.size, self.crop_fraction),
            "label": np.int32(record["label"]),
            "mask": np.bool_(True),
        }

    def empty(self) -> dict[str, np.ndarray]:
        return {
            "image": np.zeros((self.size, self.size, 3), np.uint8),
            "label": np.int32(0),
            "mask": np.bool_(False),
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


def _reduction(box: tuple[int, int, int, int], size: int) -> int:
    """The JPEG DCT-domain reduction (1, 2, 4 or 8) that keeps the crop ``size`` px or more."""
    scale = 1
    while scale < 8 and min(box[2], box[3]) // (2 * scale) >= size:
        scale *= 2
    return scale


_REDUCED = {1: 0, 2: 16, 4: 32, 8: 64}  # cv2.IMREAD_REDUCED_COLOR_k without its colour bit
_DECODE = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


def _header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a baseline or progressive JPEG's frame header, else None."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return (width, height) if width and height else None
        i += 2 + length
    return None


def _decode(data: bytes, box_fn, size: int):
    """``(pixels, box, (width, height))``: a JPEG decoded at the largest reduction that keeps
    ``box = box_fn(width, height)`` at least ``size`` a side, any other format at full size;
    the box is in the full image's coordinates."""
    dims = _header_size(data)
    if dims is None:  # not a JPEG, or one whose header we do not parse: decoded whole
        pixels = _imdecode(data, reduced=0)
        height, width = pixels.shape[:2]
        return pixels, box_fn(width, height), (width, height)
    box = box_fn(*dims)
    return _imdecode(data, reduced=_REDUCED[_reduction(box, size)]), box, dims


def decode_rgb(image) -> np.ndarray:
    """Encoded bytes (decoded whole) or a decoded ``uint8 [h, w(, c)]`` array ->
    ``uint8 [h, w, 3]``."""
    if isinstance(image, bytes | bytearray | memoryview):
        return _imdecode(bytes(image), reduced=0)
    return _rgb(np.asarray(image, np.uint8))


def _imdecode(data: bytes, reduced: int) -> np.ndarray:
    """OpenCV's RGB decode (``reduced``: an ``IMREAD_REDUCED`` bit or 0), else Pillow's."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE | reduced)
    if pixels is None:  # a format OpenCV cannot read
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("RGB"))
    return pixels


def crop_and_resize(image, box_fn, size: int, flip: bool = False) -> np.ndarray:
    """Decodes ``image``, crops ``box_fn(width, height)`` and resizes it to ``size x size``.

    ``image`` is encoded bytes (JPEG, PNG, ...) or a decoded ``uint8 [h, w(, c)]`` array.
    A JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain as long as the crop stays
    at least ``size`` pixels on each side, so the bilinear resize after it (not
    antialiased, like tf.image.resize's bicubic) shrinks by less than 2x unless the crop is
    over ``16 * size``.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        pixels, (left, top, w, h), (width, height) = _decode(bytes(image), box_fn, size)
    else:
        pixels = decode_rgb(image)
        height, width = pixels.shape[:2]
        left, top, w, h = box_fn(width, height)
    x0, x1 = _scaled(left, w, pixels.shape[1] / width, pixels.shape[1])
    y0, y1 = _scaled(top, h, pixels.shape[0] / height, pixels.shape[0])
    out = cv2.resize(pixels[y0:y1, x0:x1], (size, size), interpolation=RESIZE)
    return cv2.flip(out, 1) if flip else out


def _scaled(start: int, length: int, scale: float, limit: int) -> tuple[int, int]:
    """The pixel range ``[start, start + length)`` in an image scaled by ``scale``."""
    lo = min(int(round(start * scale)), limit - 1)
    return lo, max(lo + 1, min(limit, int(round((start + length) * scale))))


def _rgb(array: np.ndarray) -> np.ndarray:
    """``[h, w]``, ``[h, w, 1]``, ``[h, w, 3]`` or ``[h, w, 4]`` -> ``[h, w, 3]``."""
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[..., :3]


def train_image(image, rng: np.random.Generator, augment: TrainAugment) -> np.ndarray:
    """Inception crop, resize to ``augment.size``, random flip, then ``augment.translate``'s
    shift: ``uint8 [size, size, 3]``."""

    def box(width, height):
        return sample_crop(
            width, height, rng, augment.area_range, augment.ratio_range, augment.attempts
        )

    flip = augment.flip and rng.random() < 0.5
    out = crop_and_resize(image, box, augment.size, flip=flip)
    if augment.translate:
        out = translate(out, rng.integers(-augment.translate, augment.translate + 1, size=2))
    return out


def translate(image: np.ndarray, shift) -> np.ndarray:
    """``image`` ``[h, w, c]`` moved by ``shift = (down, right)`` whole pixels (negative: up,
    left), the vacated pixels 0."""
    dy, dx = (int(d) for d in shift)
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


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
