"""scikit-learn's handwritten digits (8x8, shipped inside scikit-learn) and the one train/test
split every dataset made from them shares: every fifth image (index % 5 == 0) is test, so no
digit image is in both the train and the test split of any of them."""

from __future__ import annotations

import functools

import numpy as np

TEST_EVERY = 5


@functools.cache
def digits_split(test: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices [n], images [n, 8, 8] float in 0..1, labels [n])`` of one split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = np.arange(len(digits.target))
    keep = (indices % TEST_EVERY == 0) == test
    return indices[keep], digits.images[keep] / 16.0, digits.target[keep]


__all__ = ["TEST_EVERY", "digits_split"]
