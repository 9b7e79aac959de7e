"""RetinaNet's anchors: per pyramid level, a grid of boxes of several scales and aspect ratios.

Boxes are ``(y1, x1, y2, x2)`` in input pixels. The order is level by level (P3 first), then
row-major over the level's grid, then the anchors of one position (scales outer, ratios
inner): the order in which the heads' outputs are flattened.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """Which anchors a detector predicts against.

    ``min_level``..``max_level``: pyramid levels (stride ``2**level``); ``size``: the side of
    the level's base anchor is ``size * 2**level`` (4 gives RetinaNet's 32 px at P3 and 512 px
    at P7); ``scales``: multipliers of that side (RetinaNet: 2^0, 2^(1/3), 2^(2/3));
    ``ratios``: height / width (an anchor keeps the area of its square).
    """

    min_level: int = 3
    max_level: int = 7
    size: float = 4.0
    scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    def __post_init__(self):
        if not 1 <= self.min_level <= self.max_level:
            raise ValueError(
                f"anchor levels must satisfy 1 <= min_level <= max_level, got "
                f"{self.min_level}..{self.max_level}"
            )
        if self.size <= 0 or not self.scales or not self.ratios:
            raise ValueError("anchor size must be positive, with at least one scale and ratio")
        if min(self.scales) <= 0 or min(self.ratios) <= 0:
            raise ValueError(f"anchor scales and ratios must be positive: {self}")

    @property
    def per_position(self) -> int:
        """Anchors at each grid position of a level (A in the paper's heads)."""
        return len(self.scales) * len(self.ratios)

    def levels(self) -> range:
        return range(self.min_level, self.max_level + 1)


def _level_grid(image_size: tuple[int, int], level: int) -> tuple[int, int]:
    """The level's feature-map size: the input divided by the stride, rounded up."""
    stride = 2**level
    return -(-image_size[0] // stride), -(-image_size[1] // stride)


def _base_shapes(spec: AnchorSpec, level: int) -> np.ndarray:
    """``[A, 2]`` heights and widths of one position's anchors at ``level``."""
    side = spec.size * 2**level
    shapes = [
        (side * s * np.sqrt(r), side * s / np.sqrt(r)) for s in spec.scales for r in spec.ratios
    ]
    return np.asarray(shapes, np.float64)


def anchor_boxes(image_size: tuple[int, int], spec: AnchorSpec = AnchorSpec()) -> np.ndarray:
    """``[N, 4]`` float32 anchors ``(y1, x1, y2, x2)`` for an ``image_size = (h, w)`` input,
    centred on each level's grid cells (``(i + 0.5) * stride``)."""
    h, w = image_size
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    out = []
    for level in spec.levels():
        gh, gw = _level_grid(image_size, level)
        stride = 2**level
        cy, cx = np.meshgrid(
            (np.arange(gh) + 0.5) * stride, (np.arange(gw) + 0.5) * stride, indexing="ij"
        )
        centres = np.stack([cy, cx], -1).reshape(-1, 1, 2)  # [positions, 1, 2]
        half = _base_shapes(spec, level)[None] / 2  # [1, A, 2]
        boxes = np.concatenate([centres - half, centres + half], -1)  # [positions, A, 4]
        out.append(boxes.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def anchors_per_level(image_size: tuple[int, int], spec: AnchorSpec = AnchorSpec()) -> list[int]:
    """How many anchors each level contributes, in ``anchor_boxes``'s order."""
    return [int(np.prod(_level_grid(image_size, lv))) * spec.per_position for lv in spec.levels()]
