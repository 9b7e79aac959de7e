"""Exact local attention as Pallas kernels for GPU and TPU: the "pallas" implementation.

Each kernel program takes a tile of queries and the halo of keys their windows reach (the tile
grown by the window's reach, ``tiles.query_tiles``), with the window's membership and
relative-table rows as static selector tables. The work outside the kernels is layout in XLA:
tiles and halos are cut out (slices, so their gradients are sums of pads) and padded as the
target needs. The backward pass is a second kernel that recomputes the weights from the saved
log-sum-exp; the halos' gradients are added back by the transpose of the halo cut.

It is the GPU and TPU lowering of the op's primitive (``dispatch``); the target follows the
lowering platform, so one trace carries all three:

- ``cuda`` (and ``rocm``): Triton (``pallas_kernel``, this module's layout): square 8x8 query
  tiles, heads next to the batch, every block padded to a power of two and channels to at least
  16 (Triton's matmuls). Ampere and newer NVIDIA GPUs; ``auto`` uses pure JAX on older ones.
- ``tpu``: Mosaic (``pallas_tpu``): 8x16 query tiles with positions in the lanes, so that TPU's
  (8, 128) tiles do not pad 8-channel heads 16x.
- ``cpu``: Pallas interpret mode, of the Triton layout or (``INTERPRET_LAYOUT = "mosaic"``) the
  TPU one -- how the tests check both. It is slow, so "pallas" is not offered on CPU, only run
  when asked for by name.
"""

from __future__ import annotations

from sasa_jax.attention import pallas_gpu, pallas_tpu
from sasa_jax.attention.registry import Implementation, Kernel, register

# The layout "pallas" runs in interpret mode on CPU: "triton" (pallas_gpu) or "mosaic"
# (pallas_tpu). Read when a call is traced.
INTERPRET_LAYOUT = "triton"


def _module(platform: str):
    """The layout module a platform runs, and whether in interpret mode."""
    if platform == "tpu":
        return pallas_tpu, False
    if platform in ("cuda", "rocm"):
        return pallas_gpu, False
    return (pallas_tpu if INTERPRET_LAYOUT == "mosaic" else pallas_gpu), True


def forward(q, k, v, rel_row, rel_col, rows, cols, platform):
    """The output ``[b, H, W, n, dv]`` and the log-sum-exp ``[b, H, W, n]``."""
    module, interpret = _module(platform)
    return module.forward(q, k, v, rel_row, rel_col, rows, cols, interpret=interpret)


def backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, platform):
    """The gradients, from the forward's output and log-sum-exp."""
    module, interpret = _module(platform)
    return module.backward(
        q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, interpret=interpret
    )


def supports(device) -> bool:
    """Pallas's Triton path needs an Ampere or newer NVIDIA GPU (compute capability 8.0)."""
    capability = getattr(device, "compute_capability", None)
    if getattr(device, "platform", None) not in ("gpu", "cuda") or capability is None:
        return True
    major, minor = (str(capability).split(".") + ["0"])[:2]
    return (int(major), int(minor)) >= (8, 0)


register(
    Implementation(
        "pallas",
        kernel=Kernel(forward, backward),
        available=lambda backend: backend in ("gpu", "tpu"),
        callable_on=("cpu",),
        supports=supports,
    )
)

__all__ = ["INTERPRET_LAYOUT", "backward", "forward"]
