"""RetinaNet's model: parameter counts of the standard construction, output shapes matching
the anchors, the paper's rules for attention FPN and heads, and the initial class prior."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_jax.detection import AnchorSpec, anchor_boxes
from sasa_jax.models import ModelSpec
from sasa_jax.models.projection import ProjectedAttention
from sasa_jax.models.retinanet import DetectorSpec, RetinaNet
from sasa_jax.nn import Conv1x1
from sasa_jax.nn.attention import SelfAttention2D


def _params(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _abstract(**spec):
    return nnx.eval_shape(lambda: RetinaNet(DetectorSpec(**spec), rngs=nnx.Rngs(0)))


@pytest.mark.slow
@pytest.mark.parametrize("p6_from, millions", [("p5", 33.84), ("c5", 37.97)])
def test_resnet50_retinanet_has_the_standard_parameter_count(p6_from, millions):
    """The standard construction at 80 classes (torchvision/Detectron's RetinaNet): 33.84M
    parameters with P6 from P5, 37.97M from C5 (../shared/PAPER.md, counted independently)."""
    model = _abstract(backbone=ModelSpec(depth=50), p6_from=p6_from)
    assert round(_params(model) / 1e6, 2) == millions


TINY = ModelSpec(depth=26, width_multiplier=0.25, window=3, variant="full_attention")


@pytest.mark.parametrize(
    "heads, projection", [("conv", False), ("attention", False), ("attention", True)]
)
def test_outputs_line_up_with_the_anchors(heads, projection):
    spec = DetectorSpec(
        backbone=TINY,
        heads=heads,
        num_classes=3,
        width=32,
        head_depth=1,
        attention_projection=projection,
    )
    model = nnx.eval_shape(lambda: RetinaNet(spec, rngs=nnx.Rngs(0)))
    model.eval()
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 96, 128, 3), jnp.float32)
    logits, boxes = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    n = anchor_boxes((96, 128), AnchorSpec()).shape[0]
    assert logits.shape == (2, n, 3) and boxes.shape == (2, n, 4)


@pytest.mark.slow
def test_attention_fpn_and_heads_follow_the_paper():
    """Every 3x3 layer of the FPN and heads is attention, the outputs pointwise, values ~
    N(0, 0.01) in the heads; the class output starts every anchor at probability 0.01."""
    spec = DetectorSpec(backbone=TINY, heads="attention", num_classes=5, width=64)
    model = RetinaNet(spec, rngs=nnx.Rngs(0))
    fpn = model.fpn
    assert all(isinstance(m, SelfAttention2D) for m in [*fpn.outputs, fpn.p6, fpn.p7])
    for head in (model.class_head, model.box_head):
        assert len(head.layers) == 4 and isinstance(head.output, Conv1x1)
        for layer in head.layers:
            assert isinstance(layer, SelfAttention2D)
            assert 0.008 < float(jnp.std(layer.value.kernel[...])) < 0.012
    np.testing.assert_allclose(jax.nn.sigmoid(model.class_head.output.bias[...]), 0.01, rtol=1e-5)
    conv = nnx.eval_shape(lambda: RetinaNet(DetectorSpec(backbone=TINY), rngs=nnx.Rngs(0)))
    assert isinstance(conv.class_head.output, nnx.Conv)
    assert conv.class_head.output.kernel.shape[:2] == (3, 3)


def test_attention_projection_is_attention_then_a_pointwise_w_o():
    """Each FPN and head SASA layer gains a bias-free width x width W_O (13 of them: P3-P5
    outputs, P6, P7 and 2 x 4 head layers), applied to the attention's output; the head
    layers' values keep their N(0, 0.01) start."""
    width = 32
    projected = DetectorSpec(
        backbone=TINY, heads="attention", num_classes=3, width=width, attention_projection=True
    )
    model = RetinaNet(projected, rngs=nnx.Rngs(0))
    base = _abstract(backbone=TINY, heads="attention", num_classes=3, width=width)
    assert _params(model) - _params(base) == 13 * width * width
    layer = model.fpn.p6  # strided: the projection runs on the pooled map
    assert isinstance(layer, ProjectedAttention) and layer.projection.bias is None
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, width))
    attended = np.asarray(layer.attention(x))
    w_o = np.asarray(layer.projection.kernel[...]).reshape(width, width)
    expected = np.einsum("bhwc,cd->bhwd", attended, w_o)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)
    assert expected.shape == (2, 4, 4, width)
    for head in (model.class_head, model.box_head):
        for layer in head.layers:
            assert 0.008 < float(jnp.std(layer.attention.value.kernel[...])) < 0.012


def test_fpn_and_heads_can_differ():
    """fpn= overrides heads= for the FPN alone: an attention FPN (with its batch norms) and
    conv heads (3x3 output), and the converse; the same layers as the all-attention and
    all-conv detectors' corresponding parts."""
    mixed = _abstract(backbone=TINY, heads="conv", fpn="attention", num_classes=3, width=32)
    fpn = mixed.fpn
    assert all(isinstance(m, SelfAttention2D) for m in [*fpn.outputs, fpn.p6, fpn.p7])
    assert fpn.norms is not None  # fpn_norm="attention" follows the FPN's kind
    assert all(isinstance(layer, nnx.Conv) for layer in mixed.class_head.layers)
    assert mixed.class_head.output.kernel.shape[:2] == (3, 3)
    converse = _abstract(backbone=TINY, heads="attention", fpn="conv", num_classes=3, width=32)
    assert isinstance(converse.fpn.p6, nnx.Conv) and converse.fpn.norms is None
    assert all(isinstance(layer, SelfAttention2D) for layer in converse.box_head.layers)
    attention = _abstract(backbone=TINY, heads="attention", num_classes=3, width=32)
    conv = _abstract(backbone=TINY, num_classes=3, width=32)
    parts = lambda m: (_params(m.fpn), _params(m.class_head) + _params(m.box_head))  # noqa: E731
    assert parts(mixed) == (parts(attention)[0], parts(conv)[1])
    assert parts(converse) == (parts(conv)[0], parts(attention)[1])
    with pytest.raises(ValueError, match="fpn must be"):
        DetectorSpec(fpn="transformer")


def test_head_residual_adds_each_layers_input_back():
    """head_residual="attention": each attention head layer computes relu(norm(layer(x)) + x)
    (checked against the layers applied by hand); conv heads are left alone."""
    spec = DetectorSpec(
        backbone=TINY,
        heads="attention",
        num_classes=3,
        width=16,
        head_residual="attention",
        head_norm=True,
    )
    model = RetinaNet(spec, rngs=nnx.Rngs(0))
    model.eval()
    head = model.class_head
    assert head.residual
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 16))
    y = x
    for layer, norm in zip(head.layers, head.norms[1], strict=True):
        y = jax.nn.relu(norm(layer(y)) + y)
    expected = head.output(y).reshape(2, -1, 3)
    np.testing.assert_allclose(head(x, level=1), expected, rtol=1e-5, atol=1e-5)
    plain = RetinaNet(dataclasses.replace(spec, head_residual="none"), rngs=nnx.Rngs(0))
    plain.eval()
    assert not np.allclose(plain.class_head(x, level=1), expected, atol=1e-3)
    conv = _abstract(backbone=TINY, num_classes=3, width=16, head_residual="attention")
    assert not conv.class_head.residual and not conv.box_head.residual
    with pytest.raises(ValueError, match="head_residual"):
        DetectorSpec(head_residual="yes")


def test_spec_errors():
    with pytest.raises(ValueError, match="heads"):
        DetectorSpec(heads="transformer")
    with pytest.raises(ValueError, match="attention_projection"):
        DetectorSpec(heads="conv", attention_projection=True)
    with pytest.raises(ValueError, match="levels 3..7"):
        DetectorSpec(anchors=AnchorSpec(min_level=2))
    with pytest.raises(ValueError, match="p6_from"):
        RetinaNet(DetectorSpec(backbone=TINY, p6_from="p4"), rngs=nnx.Rngs(0))


def test_fpn_norm_normalises_every_pyramid_level():
    """With fpn_norm each lateral and each of P3-P7 has a batch norm of its own (8 per FPN),
    so in training every level comes out at zero mean and unit variance per channel however
    large the backbone's features are."""
    spec = DetectorSpec(backbone=TINY, heads="attention", num_classes=3, width=32)
    model = RetinaNet(spec, rngs=nnx.Rngs(0))  # fpn_norm="attention": on for attention FPNs
    plain = RetinaNet(dataclasses.replace(spec, fpn_norm="none"), rngs=nnx.Rngs(0))
    conv = DetectorSpec(backbone=TINY, num_classes=3, width=32)
    assert not conv.normalised_fpn() and dataclasses.replace(conv, fpn_norm="all").normalised_fpn()
    with pytest.raises(ValueError, match="fpn_norm"):
        DetectorSpec(fpn_norm="yes")
    assert _params(model) - _params(plain) == 8 * 2 * 32
    key = jax.random.split(jax.random.key(1), 3)
    widths = [m.in_features for m in model.fpn.laterals]
    features = {
        f"c{i + 3}": 50.0 * jax.random.normal(key[i], (2, 16 >> i, 16 >> i, widths[i]))
        for i in range(3)
    }
    pyramid = model.fpn(features)
    for level in range(3, 8):
        p = np.asarray(pyramid[f"p{level}"]).reshape(-1, 32)
        np.testing.assert_allclose(p.mean(0), 0.0, atol=1e-3)
        np.testing.assert_allclose(p.std(0), 1.0, atol=2e-2 if level < 6 else 0.2)
    raw = plain.fpn(features)
    assert np.asarray(raw["p3"]).std() > 5.0  # without the norms the scale passes through
