"""Detection's model-free parts against plain NumPy/Python references: anchors, box coding,
matching, the focal and box losses, and non-max suppression."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sasa_jax.detection import (
    IGNORE,
    NEGATIVE,
    AnchorSpec,
    anchor_boxes,
    box_loss,
    decode,
    encode,
    focal_loss,
    match_anchors,
    non_max_suppression,
    pairwise_iou,
)
from sasa_jax.detection.anchors import anchors_per_level


def _iou_py(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, size=100.0):
    y, x = rng.uniform(0, size, (2, n))
    h, w = rng.uniform(2, size / 2, (2, n))
    return np.stack([y, x, y + h, x + w], -1).astype(np.float32)


def test_anchors_are_retinanet_s():
    """640x640, P3-P7: 9 anchors per cell of an 80, 40, 20, 10, 5 grid; P3's square anchor of
    scale 1 is 32 px centred on the first cell (4, 4); P7's largest is 512 * 2^(2/3) px."""
    spec = AnchorSpec()
    boxes = anchor_boxes((640, 640), spec)
    assert anchors_per_level((640, 640)) == [9 * g * g for g in (80, 40, 20, 10, 5)]
    assert boxes.shape == (9 * (80**2 + 40**2 + 20**2 + 10**2 + 5**2), 4)
    np.testing.assert_allclose(boxes[1], [4 - 16, 4 - 16, 4 + 16, 4 + 16], rtol=1e-6)
    # ratio 0.5 (height / width) at scale 1: height 32/sqrt(2), width 32*sqrt(2)
    h, w = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    np.testing.assert_allclose([h, w], [32 / math.sqrt(2), 32 * math.sqrt(2)], rtol=1e-6)
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    np.testing.assert_allclose(sides.max(), 512 * 2 ** (2 / 3), rtol=1e-5)
    # the second cell of P3 is one stride (8 px) to the right of the first
    np.testing.assert_allclose(boxes[9 + 4] - boxes[4], [0, 8, 0, 8], atol=1e-5)


def test_anchor_spec_errors():
    with pytest.raises(ValueError, match="min_level"):
        AnchorSpec(min_level=5, max_level=3)
    with pytest.raises(ValueError, match="positive"):
        AnchorSpec(ratios=(0.0,))
    with pytest.raises(ValueError, match="image_size"):
        anchor_boxes((0, 10))


def test_iou_against_python():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
    want = [[_iou_py(x, y) for y in b] for x in a]
    np.testing.assert_allclose(pairwise_iou(a, b), want, rtol=1e-5, atol=1e-7)


def test_box_coding_round_trips_and_has_known_values():
    rng = np.random.default_rng(1)
    boxes, anchors = _random_boxes(rng, 20), _random_boxes(rng, 20)
    np.testing.assert_allclose(decode(encode(boxes, anchors), anchors), boxes, atol=1e-3)
    # a box twice the anchor's height, centred one anchor width to the right
    got = encode(jnp.array([[0.0, 10.0, 20.0, 20.0]]), jnp.array([[5.0, 0.0, 15.0, 10.0]]))
    np.testing.assert_allclose(got, [[0.0, 1.0, math.log(2.0), 0.0]], atol=1e-6)


def _match_py(anchors, boxes, classes, valid, pos=0.5, neg=0.4):
    labels, matched = [], []
    for a in anchors:
        ious = [_iou_py(a, b) if v else -1.0 for b, v in zip(boxes, valid, strict=True)]
        j = int(np.argmax(ious)) if ious else 0
        best = max(ious) if ious else -1.0
        labels.append(int(classes[j]) if best >= pos else (NEGATIVE if best < neg else IGNORE))
        matched.append(boxes[j] if len(boxes) else np.zeros(4))
    return np.array(labels), np.array(matched)


def test_matching_on_hand_made_boxes():
    """IoU 1 -> positive; 0.45 -> ignored; 0.2 -> negative; a padded box never matches."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    classes = np.array([3, 7, 5])
    valid = np.array([True, False, True])
    anchors = np.array(
        [[0, 0, 10, 10], [0, 0, 10, 4.5], [0, 0, 10, 2], [50, 50, 60, 60], [80, 80, 90, 90]],
        np.float32,
    )
    labels, matched = match_anchors(anchors, boxes, classes, valid)
    np.testing.assert_array_equal(labels, [3, IGNORE, NEGATIVE, 5, NEGATIVE])
    np.testing.assert_array_equal(matched[0], boxes[0])
    np.testing.assert_array_equal(matched[3], boxes[2])


def test_forced_matching_gives_every_box_its_best_anchor():
    """A small box that reaches IoU 0.5 with no anchor still gets one positive: its best
    anchor (IoU 0.25 here), labelled with its class; without force_match it gets none."""
    boxes = np.array([[0, 0, 10, 10], [40, 40, 45, 45], [0, 0, 1, 1]], np.float32)
    classes, valid = np.array([3, 6, 9]), np.array([True, True, False])
    anchors = np.array(
        [[0, 0, 10, 10], [40, 40, 50, 50], [30, 30, 50, 50], [80, 80, 90, 90]], np.float32
    )
    plain, _ = match_anchors(anchors, boxes, classes, valid)
    np.testing.assert_array_equal(plain, [3, NEGATIVE, NEGATIVE, NEGATIVE])
    labels, matched = match_anchors(anchors, boxes, classes, valid, force_match=True)
    np.testing.assert_array_equal(labels, [3, 6, NEGATIVE, NEGATIVE])
    np.testing.assert_array_equal(matched[1], boxes[1])


def test_forced_matching_against_python_on_random_boxes():
    rng = np.random.default_rng(5)
    anchors, boxes = _random_boxes(rng, 50), _random_boxes(rng, 5) * 0.3  # small boxes
    classes, valid = rng.integers(0, 4, 5), np.array([1, 1, 0, 1, 1], bool)
    want, want_matched = _match_py(anchors, boxes, classes, valid)
    plain = want.copy()
    for g in np.flatnonzero(valid):  # each box claims its best anchor, first box first
        a = int(np.argmax([_iou_py(x, boxes[g]) for x in anchors]))
        if not any(
            int(np.argmax([_iou_py(x, boxes[h]) for x in anchors])) == a
            for h in np.flatnonzero(valid)
            if h < g
        ):
            want[a], want_matched[a] = classes[g], boxes[g]
    labels, matched = match_anchors(anchors, boxes, classes, valid, force_match=True)
    np.testing.assert_array_equal(labels, want)
    positive = want >= 0
    assert (want != plain).sum() >= 2  # boxes that only forcing gives a positive
    np.testing.assert_array_equal(np.asarray(matched)[positive], want_matched[positive])


def test_matching_against_python_on_random_boxes():
    rng = np.random.default_rng(2)
    anchors, boxes = _random_boxes(rng, 60), _random_boxes(rng, 6)
    anchors[:6] = boxes + rng.uniform(-3, 3, boxes.shape)  # some clear positives
    classes, valid = rng.integers(0, 4, 6), np.array([1, 1, 1, 0, 1, 1], bool)
    labels, matched = match_anchors(anchors, boxes, classes, valid)
    want_labels, want_matched = _match_py(anchors, boxes, classes, valid)
    np.testing.assert_array_equal(labels, want_labels)
    positive = want_labels >= 0
    assert positive.sum() >= 3
    np.testing.assert_array_equal(np.asarray(matched)[positive], want_matched[positive])


def test_matching_without_valid_boxes_is_all_negative():
    anchors = _random_boxes(np.random.default_rng(3), 4)
    labels, _ = match_anchors(anchors, np.zeros((2, 4)), np.zeros(2, int), np.zeros(2, bool))
    np.testing.assert_array_equal(labels, [NEGATIVE] * 4)
    with pytest.raises(ValueError, match="negative <= positive"):
        match_anchors(anchors, anchors, np.zeros(4, int), np.ones(4, bool), negative=0.6)


def test_focal_loss_against_the_formula():
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), per anchor and class, ignored anchors out."""
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (5, 3)).astype(np.float32)
    labels = np.array([0, 2, NEGATIVE, IGNORE, 1])
    total = 0.0
    for n in range(5):
        if labels[n] == IGNORE:
            continue
        for c in range(3):
            p = 1 / (1 + math.exp(-float(logits[n, c])))
            positive = labels[n] == c
            p_t, alpha_t = (p, 0.25) if positive else (1 - p, 0.75)
            total += -alpha_t * (1 - p_t) ** 2 * math.log(p_t)
    np.testing.assert_allclose(focal_loss(logits, labels, 3), total, rtol=1e-5)
    # a huge confident mistake stays finite
    assert np.isfinite(focal_loss(jnp.array([[-200.0]]), jnp.array([0]), 1))


def test_box_loss_is_huber_over_positives():
    deltas = np.array([[0.05, -0.3, 0, 0], [1, 1, 1, 1]], np.float32)
    targets = np.zeros((2, 4), np.float32)
    want = 0.5 * 0.05**2 + 0.1 * (0.3 - 0.05)  # only the first anchor is positive
    got = box_loss(deltas, targets, np.array([2, NEGATIVE]))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _nms_py(boxes, scores, max_outputs, threshold):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if scores[i] == -np.inf:
            continue
        if all(_iou_py(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept[:max_outputs]


@pytest.mark.parametrize("n, max_outputs, threshold", [(30, 10, 0.5), (12, 20, 0.3), (1, 3, 0.5)])
def test_nms_against_python(n, max_outputs, threshold):
    rng = np.random.default_rng(n)
    # jittered copies of 4 boxes: overlaps on both sides of the threshold
    boxes = _random_boxes(rng, 4)[rng.integers(0, 4, n)] + rng.uniform(-4, 4, (n, 4))
    boxes = boxes.astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if n > 3:
        scores[2] = scores[5]  # a tie: the lower index goes first
        scores[4] = -np.inf
    indices, valid = jax.jit(
        lambda b, s: non_max_suppression(b, s, max_outputs, iou_threshold=threshold)
    )(boxes, scores)
    want = _nms_py(boxes, scores, max_outputs, threshold)
    if n > 3:
        assert len(want) < min(n - 1, max_outputs)  # something was suppressed
    assert int(valid.sum()) == len(want)
    np.testing.assert_array_equal(np.asarray(indices)[: len(want)], want)
    assert not np.asarray(valid)[len(want) :].any()
    assert indices.shape == (max_outputs,)


def _detect_py(logits, deltas, anchors, size, threshold, pre_nms, max_det, iou):
    boxes = np.clip(np.asarray(decode(deltas, anchors)), 0, [size[0], size[1]] * 2)
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    found = []
    for c in range(logits.shape[1]):
        s = np.where(scores[:, c] > threshold, scores[:, c], -np.inf)
        top = sorted(range(len(s)), key=lambda i: (-s[i], i))[:pre_nms]
        kept = _nms_py(boxes[top], s[top], max_det, iou)
        found += [(-s[top][k], c, rank, top[k]) for rank, k in enumerate(kept)]
    found.sort()
    return [(c, a) for _, c, _, a in found[:max_det]], boxes


@pytest.mark.parametrize("pre_nms", [6, 15])  # 6 cuts each class's candidates, 15 does not
def test_detect_against_python(pre_nms):
    """Score threshold, per-class top-k and NMS, then the best over all classes."""
    from sasa_jax.detection.postprocess import detect

    rng = np.random.default_rng(7)
    anchors = _random_boxes(rng, 6)[rng.integers(0, 6, 40)] + rng.uniform(-3, 3, (40, 4))
    anchors = anchors.astype(np.float32)
    logits = rng.normal(-2, 2, (2, 40, 3)).astype(np.float32)
    deltas = rng.normal(0, 0.1, (2, 40, 4)).astype(np.float32)
    settings = dict(score_threshold=0.3, pre_nms=pre_nms, max_detections=30, iou_threshold=0.5)
    got = jax.jit(lambda lg, d: detect(lg, d, anchors, (60, 70), **settings))(logits, deltas)
    for i in range(2):
        want, boxes = _detect_py(logits[i], deltas[i], anchors, (60, 70), *settings.values())
        assert 0 < len(want) < 30  # the threshold and NMS decide, not the cap
        valid = np.asarray(got["valid"][i])
        assert valid.sum() == len(want) and not valid[len(want) :].any()
        np.testing.assert_array_equal(got["classes"][i][: len(want)], [c for c, _ in want])
        np.testing.assert_allclose(
            got["boxes"][i][: len(want)], [boxes[a] for _, a in want], atol=1e-4
        )
        assert float(got["boxes"][i].max()) <= 70 and float(got["boxes"][i].min()) >= 0


def test_targets_and_loss():
    """Per-image matching and encoding; the loss is (focal + 50 * box) / positives."""
    from sasa_jax.detection.targets import assign_targets, detection_loss

    rng = np.random.default_rng(8)
    anchors = _random_boxes(rng, 30)
    boxes = np.stack([anchors[:3] + 1.0, np.zeros((3, 4), np.float32)])
    classes = np.array([[0, 1, 2], [0, 0, 0]])
    valid = np.array([[True, True, False], [False, False, False]])
    labels, targets = assign_targets(anchors, boxes, classes, valid)
    for i in range(2):
        want, matched = _match_py(anchors, boxes[i], classes[i], valid[i])
        np.testing.assert_array_equal(labels[i], want)
        pos = want >= 0
        np.testing.assert_allclose(
            np.asarray(targets[i])[pos], encode(matched[pos], anchors[pos]), atol=1e-5
        )
    assert int((labels[1] >= 0).sum()) == 0
    logits = rng.normal(0, 1, (2, 30, 3)).astype(np.float32)
    deltas = rng.normal(0, 0.2, (2, 30, 4)).astype(np.float32)
    loss, parts = detection_loss(logits, deltas, labels, targets)
    positives = int((np.asarray(labels) >= 0).sum())
    assert positives >= 2 and int(parts["positives"]) == positives
    want = (focal_loss(logits, labels, 3) + 50 * box_loss(deltas, targets, labels)) / positives
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # no positives at all: divided by 1, finite
    none = jnp.full((1, 30), NEGATIVE)
    assert np.isfinite(detection_loss(logits[:1], deltas[:1], none, targets[:1])[0])
