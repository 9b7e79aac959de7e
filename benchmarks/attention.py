"""Times the SASA layer against the 3x3 convolution it replaces, forward+backward.

The layer is the Q/K/V projections plus ``local_attention`` (k=7, 8 heads, relative logits,
border "mask"); the baseline is a bias-free 3x3 "SAME" convolution with the same in and out
width, on the four ResNet-50 stage shapes. Defaults: batch 8 in float32 on CPU, batch 64 in
bfloat16 on GPU and TPU. Reported per shape and implementation: median step time, compiled
temp memory (``memory_analysis()``), both as ratios to the convolution, and on a known
accelerator the layer's roofline (``roofline.py``: its FLOPs, the fewest bytes it must move,
and the time those take at the device's peak). The convolution and each implementation are
timed alternately, call by call, and the time ratio is the median of the per-call ratios: a
machine's speed drifts over minutes, and timing them apart mixes that drift into the ratio.
``--stem`` times the attention stem (``block_attention`` on 4x4 blocks, 4 heads; 224x224,
3 -> 64 channels, or ``--stem_shape``) the same way against the 7x7 stride-2 conv stem's
convolution.

    python benchmarks/attention.py                       # all stages, every implementation
    python benchmarks/attention.py --shapes 56x64 --implementations native --json
    python benchmarks/attention.py --batch 64 --dtype bfloat16 --implementations pallas --stem
    python benchmarks/attention.py --shapes --stem --stem_shape 48x1x16 --batch 64  # digits
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import roofline
from flax import nnx

import sasa_jax
from sasa_jax.nn.attention import SelfAttention2D
from sasa_jax.nn.stem_attention import StemAttention

STAGES = ("56x64", "28x128", "14x256", "7x512")
ON_CPU = jax.default_backend() == "cpu"


def _parse_shape(text: str) -> tuple[int, int]:
    size, width = text.split("x")
    return int(size), int(width)


def _compiled_step(loss, params, x):
    grad = jax.jit(jax.value_and_grad(loss))
    compiled = grad.lower(params, x).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def _timer(compiled, params, x) -> Callable[[], float]:
    """Warms ``compiled`` up and returns a function that times one call (seconds)."""
    jax.block_until_ready(compiled(params, x))

    def once() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        return time.perf_counter() - start

    return once


def conv_step(size: int, width: int, batch: int, dtype, kernel=3, stride=1, cin=None) -> dict:
    """The convolution's fwd+bwd: ``{"time": timer, "temp_bytes", "forward_flops"}``."""
    cin = cin or width
    key_w, key_x = jax.random.split(jax.random.key(0))
    params = jax.random.normal(key_w, (kernel, kernel, cin, width)) * (kernel**2 * cin) ** -0.5
    x = jax.random.normal(key_x, (batch, size, size, cin), dtype)

    def loss(params, x):
        y = jax.lax.conv_general_dilated(
            x,
            params.astype(dtype),
            (stride, stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return jnp.sum(y.astype(jnp.float32) ** 2)

    compiled, temp = _compiled_step(loss, params, x)
    out = size // stride
    flops = 2 * kernel**2 * cin * width * out * out * batch
    return {"time": _timer(compiled, params, x), "temp_bytes": int(temp), "forward_flops": flops}


def _layer_step(layer, x) -> tuple:
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) ** 2)

    compiled, temp = _compiled_step(loss, params, x)
    count = sum(p.size for p in jax.tree.leaves(params))
    return _timer(compiled, params, x), int(temp), count


def attention_step(size: int, width: int, batch: int, implementation: str, dtype) -> dict:
    """The SASA layer's fwd+bwd, as ``conv_step``, with its roofline on a known device."""
    layer = SelfAttention2D(
        width,
        width,
        window=7,
        num_heads=8,
        implementation=implementation,
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    x = jax.random.normal(jax.random.key(1), (batch, size, size, width), dtype)
    timer, temp, params = _layer_step(layer, x)
    head = width // 8
    pixels = batch * size * size
    flops = 2 * pixels * (3 * width * width + 49 * 8 * (2 * head) + 8 * 7 * 2 * (head // 2))
    bound = roofline.bound(3 * flops, roofline.layer_bytes(pixels, width, params, dtype), dtype)
    return {"time": timer, "temp_bytes": temp, "forward_flops": flops, "roofline": bound}


def stem_step(
    batch: int, implementation: str, dtype, shape: tuple[int, int, int] = (224, 3, 64)
) -> dict:
    """The attention stem's attention fwd+bwd (4 heads, 4x4 blocks, spatially-aware values);
    ``shape`` is (image size, in channels, out channels): ``[batch, size, size, in] ->
    [batch, size, size, out]``."""
    size, cin, cout = shape
    layer = StemAttention(cin, cout, implementation=implementation, dtype=dtype, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (batch, size, size, cin), dtype)
    timer, temp, params = _layer_step(layer, x)
    pixels = batch * size * size
    # Q, K and the values' projections, logits and weighted values over the 16 taps, and the
    # relative terms counted as 2 * 7 * head_dim a pixel.
    head = cout // 4
    flops = 2 * pixels * (3 * cin * cout + 2 * 16 * cout + 2 * 7 * head)
    bound = roofline.bound(3 * flops, roofline.layer_bytes(pixels, cout, params, dtype), dtype)
    return {"time": timer, "temp_bytes": temp, "forward_flops": flops, "roofline": bound}


def _stem_shape(text: str) -> tuple[int, int, int]:
    """``SIZExINxOUT`` -> (size, in, out); a ValueError naming the flag otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--stem_shape takes SIZExINxOUT, e.g. 224x3x64, got {text!r}")
    size, cin, cout = (int(p) for p in parts)
    if size % 4 or cout % 8:
        raise ValueError(f"--stem_shape needs SIZE a multiple of 4 and OUT of 8, got {text!r}")
    return size, cin, cout


def time_pair(conv: dict, att: dict, repeats: int) -> tuple[float, float, float]:
    """Median conv and attention seconds and the median of their per-repeat ratios, timed
    alternately so that both see the same spells of machine noise."""
    conv_times, att_times = [], []
    for _ in range(repeats):
        conv_times.append(conv["time"]())
        att_times.append(att["time"]())
    ratios = np.array(att_times) / np.array(conv_times)
    return float(np.median(conv_times)), float(np.median(att_times)), float(np.median(ratios))


def _row(shape: str, impl: str, conv: dict, att: dict, repeats: int) -> dict:
    conv_s, att_s, ratio = time_pair(conv, att, repeats)
    row = {
        "shape": shape,
        "implementation": impl,
        "conv_ms": 1e3 * conv_s,
        "attention_ms": 1e3 * att_s,
        "time_ratio": ratio,
        "conv_temp_mib": conv["temp_bytes"] / 2**20,
        "attention_temp_mib": att["temp_bytes"] / 2**20,
        "temp_ratio": att["temp_bytes"] / max(conv["temp_bytes"], 1),
        "flops_ratio": att["forward_flops"] / conv["forward_flops"],
        "roofline": att["roofline"],
    }
    line = (
        f"{shape:>14} {impl:>8}: conv {row['conv_ms']:8.2f} ms, attention "
        f"{row['attention_ms']:8.2f} ms ({ratio:5.2f}x); temp {row['conv_temp_mib']:7.1f} vs "
        f"{row['attention_temp_mib']:8.1f} MiB ({row['temp_ratio']:5.1f}x); FLOPs "
        f"{row['flops_ratio']:.2f}x"
    )
    if att["roofline"]:
        r = att["roofline"]
        line += (
            f"; roofline {r['flops'] / 1e9:.1f} GFLOP, {r['bytes'] / 2**20:.0f} MiB -> "
            f"{1e3 * r['seconds']:.3f} ms ({r['limit']}), attention at "
            f"{r['seconds'] / att_s:.0%} of it"
        )
    print(line, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=list(STAGES),
        help="SIZExWIDTH stage shapes; none (a bare --shapes) times --stem alone",
    )
    parser.add_argument(
        "--implementations", nargs="+", default=sasa_jax.attention_implementations()
    )
    parser.add_argument("--batch", type=int, default=8 if ON_CPU else 64)
    parser.add_argument(
        "--dtype", default="float32" if ON_CPU else "bfloat16", choices=["float32", "bfloat16"]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stem", action="store_true", help="also time the attention stem")
    parser.add_argument(
        "--stem_shape",
        default="224x3x64",
        help="SIZExINxOUT of --stem: 224x3x64 (ImageNet), 48x1x16 (configs/digits_clutter.py)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    stem_shape = _stem_shape(args.stem_shape)

    rows = []
    for shape in args.shapes:
        size, width = _parse_shape(shape)
        conv = conv_step(size, width, args.batch, dtype)
        for impl in args.implementations:
            att = attention_step(size, width, args.batch, impl, dtype)
            rows.append(_row(f"{size}x{size}x{width}", impl, conv, att, args.repeats))
    if args.stem:
        size, cin, cout = stem_shape
        conv = conv_step(size, cout, args.batch, dtype, kernel=7, stride=2, cin=cin)
        for impl in args.implementations:
            att = stem_step(args.batch, impl, dtype, stem_shape)
            rows.append(_row(f"stem {size}x{size}x{cin}->{cout}", impl, conv, att, args.repeats))
    if args.json:
        print(json.dumps({**roofline.run_header(args.batch, args.dtype), "rows": rows}))


if __name__ == "__main__":
    main()
