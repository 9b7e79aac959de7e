"""Lower bounds on a layer's time from its FLOPs and the bytes it must move.

``bound(flops, bytes, device)`` is ``max(flops / peak FLOP/s, bytes / peak bandwidth)`` for
the device's dense peak at the compute dtype (vendor datasheet figures; no sparsity). The
minimal bytes of a layer's forward and backward pass are its activations and parameters read
and written once each (``layer_bytes``); the FLOPs are the forward pass's times three.
Unknown devices (a CPU) get no bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# device kind (as jax reports it, lower case, substring) -> (bf16 FLOP/s, f32 FLOP/s, bytes/s)
PEAKS = {
    "h200": (989e12, 67e12, 4.8e12),
    "h100": (989e12, 67e12, 3.35e12),
    "a100": (312e12, 19.5e12, 2.0e12),
    "l4": (121e12, 30e12, 0.3e12),
    "tpu v5 lite": (197e12, 197e12 / 2, 0.82e12),
    "tpu v5e": (197e12, 197e12 / 2, 0.82e12),
    "tpu v5p": (459e12, 459e12 / 2, 2.76e12),
    "tpu v4": (275e12, 275e12 / 2, 1.2e12),
}


def run_header(batch: int, dtype: str) -> dict:
    """What every benchmark's JSON line starts with: where it ran, the batch and dtype."""
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "dtype": dtype,
    }


def device_peaks(device=None) -> tuple[float, float, float] | None:
    """``(bf16 FLOP/s, f32 FLOP/s, bytes/s)`` of ``device`` (default: the first), or None."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peaks in PEAKS.items():
        if name in kind:
            return peaks
    return None


def layer_bytes(pixels: int, width: int, params: int, dtype) -> int:
    """Fewest bytes a spatial layer's forward and backward pass move: the input and output
    in the forward pass, the input, output gradient and input gradient in the backward pass,
    and the parameters read twice and their gradient written once."""
    itemsize = jnp.dtype(dtype).itemsize
    return itemsize * (5 * pixels * width + 3 * params)


def bound(flops: float, nbytes: float, dtype, device=None) -> dict | None:
    """``{"flops", "bytes", "seconds", "limit"}`` for ``device``, or None if unknown."""
    peaks = device_peaks(device)
    if peaks is None:
        return None
    compute = peaks[0] if jnp.dtype(dtype).itemsize == 2 else peaks[1]
    seconds = max(flops / compute, nbytes / peaks[2])
    limit = "compute" if flops / compute >= nbytes / peaks[2] else "memory"
    return {"flops": flops, "bytes": nbytes, "seconds": seconds, "limit": limit}
