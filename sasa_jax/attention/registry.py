"""The registry of the op's implementations and how ``auto`` chooses among them.

Each implementation module registers an ``Implementation`` on import; the public op
(``api``) and its primitive (``dispatch``) look them up here. Nothing here imports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from sasa_jax.attention.windows import AxisWindow

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An implementation's passes for the primitives.

    ``forward(q, k, v, rel_row, rel_col, rows, cols, platform) -> (out, lse)`` and
    ``backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, platform) -> (dq, dk,
    dv, d_rel_row, d_rel_col)``, with ``k`` and the tables None when absent (their gradients
    None too), ``rows``/``cols`` the ``AxisWindow`` of each axis (any border, or ``BLOCKS``)
    and ``platform`` the lowering platform.
    """

    forward: Callable[..., tuple[Array, Array]]
    backward: Callable[..., tuple[Any, ...]]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered implementation of the op.

    ``kernel`` (a ``dispatch.Kernel``: forward and backward passes that keep only the
    log-sum-exp) makes it one of the per-platform choices of the op's primitive: how
    "native", "pallas", "tiled" and "dense" run, and all that "auto" picks. ``fn(q, k, v,
    rel_row, rel_col, rows, cols, return_weights)`` is called directly instead, with checked
    arguments (``k`` and the tables may be None) and the ``AxisWindow`` of each axis, when
    there is no kernel ("gather") or when the weights are asked for and ``fn`` computes them
    itself; other implementations take their weights from "gather". ``available(backend)``
    says whether it is offered on a JAX backend ("cpu", "gpu", "tpu"): listed by
    ``attention_implementations`` and open to ``auto``. ``callable_on`` names backends where
    it runs when asked for by name although it is not offered there (the Pallas kernels in
    interpret mode on CPU, for tests). ``supports(device)`` says whether it runs on the device
    a call is compiled for (the Triton kernels need an Ampere or newer GPU); ``auto`` then
    takes its next rule.
    """

    name: str
    fn: Callable[..., Any] | None = None
    kernel: Kernel | None = None
    available: Callable[[str], bool] = lambda backend: True
    callable_on: tuple[str, ...] = ()
    supports: Callable[[Any], bool] = lambda device: True


_REGISTRY: dict[str, Implementation] = {}

# The JAX backends "auto" chooses for (each lowering platform takes its backend's choice).
BACKENDS = ("cpu", "gpu", "tpu")


def register(impl: Implementation) -> None:
    """Adds an implementation (each implementation module registers itself on import)."""
    _REGISTRY[impl.name] = impl


def names() -> list[str]:
    """Every registered implementation's name, sorted (offered on this backend or not)."""
    return sorted(_REGISTRY)


def registered(name: str) -> Implementation:
    """The registered implementation called ``name`` (no availability check)."""
    return _REGISTRY[name]


# How "auto" chooses, per backend: rules tried in order, each ``(name, applies(q_shape,
# rows, cols))``; the first that applies and is available wins, else "gather".
_AUTO_RULES: dict[str, list[tuple[str, Callable[..., bool]]]] = {}


def _window_covers_map(q_shape, rows: AxisWindow, cols: AxisWindow) -> bool:
    """Dense attention wastes at most 4x the window's work: the map is small."""
    return rows.size * cols.size <= 4 * rows.window * cols.window


def _map_within_window(q_shape, rows: AxisWindow, cols: AxisWindow) -> bool:
    """The map has no more positions than one window: dense attention wastes nothing."""
    return rows.size * cols.size <= rows.window * cols.window


def add_auto_rule(backend: str, name: str, applies: Callable[..., bool], first: bool = True):
    """Makes ``auto`` pick implementation ``name`` on ``backend`` where ``applies(q_shape,
    rows, cols)`` holds (checked before the existing rules, unless ``first=False``)."""
    rules = _AUTO_RULES.setdefault(backend, _default_rules(backend))
    rules.insert(0 if first else len(rules), (name, applies))


def _default_rules(backend: str) -> list[tuple[str, Callable[..., bool]]]:
    # The measurements behind these rules are in docs/performance.md. CPU: the C++ kernel
    # ("native") beats every pure-JAX implementation at every ResNet stage shape; without it,
    # dense wins where the window covers a quarter of the map or more, tiled elsewhere.
    # GPU (an H200, batch 64, bf16, forward and backward): the Triton kernel ("pallas") beats
    # tiled where the map is no larger than one window (the 7x7 stage and the stem's 4x4
    # blocks); from 14x14 up tiled takes 0.3-0.5 of its time and 0.2-0.75 of its memory.
    # Without the kernel (before Ampere), on an H100 at batch 8 tiled beat dense from 14x14
    # up. TPU: the Pallas kernel (not yet timed on one), else the CPU's pure-JAX rules.
    if backend == "gpu":
        return [
            ("pallas", _map_within_window),
            ("dense", _map_within_window),
            ("tiled", lambda *_: True),
        ]
    return [
        ("native" if backend == "cpu" else "pallas", lambda *_: True),
        ("dense", _window_covers_map),
        ("tiled", lambda *_: True),
    ]


def auto_choice(
    q_shape: tuple[int, ...],
    rows: AxisWindow,
    cols: AxisWindow,
    backend: str | None = None,
    device: Any = None,
) -> str:
    """The implementation ``auto`` runs for this shape and geometry on ``backend`` (and, when
    given, on ``device``: an implementation that does not support it is passed over)."""
    backend = backend or jax.default_backend()
    for name, applies in _AUTO_RULES.get(backend) or _default_rules(backend):
        impl = _REGISTRY.get(name)
        if impl is None or not impl.available(backend) or not applies(q_shape, rows, cols):
            continue
        if device is None or impl.supports(device):
            return name
    return "gather"


def choices(name: str, q_shape, rows: AxisWindow, cols: AxisWindow) -> dict[str, str]:
    """The implementation for each backend: ``auto``'s per-backend choice, or ``name``."""
    if name == "auto":
        return {backend: auto_choice(tuple(q_shape), rows, cols, backend) for backend in BACKENDS}
    return dict.fromkeys(BACKENDS, name)


def attention_implementations(backend: str | None = None) -> list[str]:
    """Names of the implementations offered on ``backend`` (default: JAX's default backend).
    Listing builds nothing: the CPU kernel is compiled the first time the op runs on CPU."""
    backend = backend or jax.default_backend()
    return [name for name, impl in _REGISTRY.items() if impl.available(backend)]


__all__ = [
    "BACKENDS",
    "Implementation",
    "Kernel",
    "add_auto_rule",
    "attention_implementations",
    "auto_choice",
    "choices",
    "names",
    "register",
    "registered",
]
