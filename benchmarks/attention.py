"""Times the SASA layer against the 3x3 convolution it replaces, forward+backward.

The layer is the Q/K/V projections plus ``local_attention`` (k=7, 8 heads, relative logits,
border "mask"); the baseline is a bias-free 3x3 "SAME" convolution with the same in and out
width. Both run fp32 at batch 8 on the four ResNet-50 stage shapes. Reported per shape and
implementation: median step time, compiled temp memory (``memory_analysis()``), and both as
ratios to the convolution. The convolution and each implementation are timed alternately,
call by call, and the time ratio is the median of the per-call ratios: this machine's speed
drifts by tens of percent over minutes, and timing them apart mixed that drift into the ratio.

    python benchmarks/attention.py                       # all stages, all implementations
    python benchmarks/attention.py --shapes 56x64 --implementations gather --json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sasa_jax
from sasa_jax.layers import SelfAttention2D

STAGES = ("56x64", "28x128", "14x256", "7x512")


def _parse_shape(text: str) -> tuple[int, int]:
    size, width = text.split("x")
    return int(size), int(width)


def _conv_loss(params, x):
    y = jax.lax.conv_general_dilated(
        x, params, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(y**2)


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


def conv_step(size: int, width: int, batch: int) -> dict:
    """The 3x3 convolution's fwd+bwd: ``{"time": timer, "temp_bytes", "forward_flops"}``."""
    key_w, key_x = jax.random.split(jax.random.key(0))
    params = jax.random.normal(key_w, (3, 3, width, width)) * (9 * width) ** -0.5
    x = jax.random.normal(key_x, (batch, size, size, width))
    compiled, temp = _compiled_step(_conv_loss, params, x)
    flops = 2 * 9 * width * width * size * size * batch
    return {"time": _timer(compiled, params, x), "temp_bytes": int(temp), "forward_flops": flops}


def attention_step(size: int, width: int, batch: int, implementation: str) -> dict:
    """The SASA layer's fwd+bwd, as ``conv_step``."""
    layer = SelfAttention2D(
        width, width, window=7, num_heads=8, implementation=implementation, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, width))

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    compiled, temp = _compiled_step(loss, params, x)
    head = width // 8
    pixels = batch * size * size
    flops = 2 * pixels * (3 * width * width + 49 * 8 * (2 * head) + 8 * 7 * 2 * (head // 2))
    return {"time": _timer(compiled, params, x), "temp_bytes": int(temp), "forward_flops": flops}


def time_pair(conv: dict, att: dict, repeats: int) -> tuple[float, float, float]:
    """Median conv and attention seconds and the median of their per-repeat ratios, timed
    alternately so that both see the same spells of machine noise."""
    conv_times, att_times = [], []
    for _ in range(repeats):
        conv_times.append(conv["time"]())
        att_times.append(att["time"]())
    ratios = np.array(att_times) / np.array(conv_times)
    return float(np.median(conv_times)), float(np.median(att_times)), float(np.median(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(STAGES), help="SIZExWIDTH stage shapes")
    parser.add_argument(
        "--implementations", nargs="+", default=sasa_jax.attention_implementations()
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()

    rows = []
    for shape in args.shapes:
        size, width = _parse_shape(shape)
        conv = conv_step(size, width, args.batch)
        for impl in args.implementations:
            att = attention_step(size, width, args.batch, impl)
            conv_s, att_s, ratio = time_pair(conv, att, args.repeats)
            rows.append(
                {
                    "shape": f"{size}x{size}x{width}",
                    "implementation": impl,
                    "conv_ms": 1e3 * conv_s,
                    "attention_ms": 1e3 * att_s,
                    "time_ratio": ratio,
                    "conv_temp_mib": conv["temp_bytes"] / 2**20,
                    "attention_temp_mib": att["temp_bytes"] / 2**20,
                    "temp_ratio": att["temp_bytes"] / max(conv["temp_bytes"], 1),
                    "flops_ratio": att["forward_flops"] / conv["forward_flops"],
                }
            )
            r = rows[-1]
            print(
                f"{r['shape']:>12} {impl:>10}: conv {r['conv_ms']:8.1f} ms, "
                f"attention {r['attention_ms']:8.1f} ms ({r['time_ratio']:5.1f}x); temp "
                f"{r['conv_temp_mib']:7.1f} vs {r['attention_temp_mib']:8.1f} MiB "
                f"({r['temp_ratio']:5.1f}x); FLOPs {r['flops_ratio']:.2f}x",
                flush=True,
            )
    if args.json:
        print(json.dumps({"backend": jax.default_backend(), "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
