"""The Pallas kernels of the "pallas" implementation: one query tile against its key halo.

Each program of the grid takes one (image, head) pair and one tile of ``TQ`` queries (a 2-D
tile of the map, flattened), the ``M`` keys and values of the tile's halo (flattened), and two
int32 selector tables ``[TQ, M]``: for each query and halo key, the row of the relative table
the pair reads along rows and along columns, or -1 where the key is not in the query's
softmax. Everything in the kernel is 2-D, so it lowers for Mosaic TPU and Triton alike:

- logits ``q · kᵀ`` as one matmul (f32 accumulation), plus the relative term: a loop over the
  table rows ``r`` adding the column ``q · table[r]`` where the selector is ``r``;
- a single-pass softmax (the whole halo is one block), in float32;
- the output ``p · v`` as one matmul, and the log-sum-exp for the backward pass.

The backward kernel recomputes the weights from the log-sum-exp (flash-attention style) and
returns ``dq`` for the tile, ``dk`` and ``dv`` for the halo (the caller adds the halos up),
and the tile's share of the relative tables' gradients. The tables are padded to the channel
width ``[L, C]`` with the row half in the first ``d/2`` channels and the column half in the
next ``d/2`` (zeros elsewhere), so ``q · table[r]`` is a full-width product.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# The logit of a key outside a query's softmax: finite, so that a row's maximum is finite and
# exp(logit - max) is exactly 0.
MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What the kernels are compiled for (static).

    Attributes:
      has_key: q·k logits (False: the relative terms alone).
      has_rel: relative tables are given.
      rel_rows, rel_cols: the tables' lengths (rows used of the padded ``[L, C]`` blocks).
      precision: of the f32 matmuls (HIGHEST: exact float32, no TF32 or bf16 passes).
    """

    has_key: bool
    has_rel: bool
    rel_rows: int
    rel_cols: int
    precision: jax.lax.Precision | None


def _dot(a, b, spec: KernelSpec, contract=((1,), (1,))):
    """A 2-D matmul with float32 accumulation; ``contract`` as in ``dot_general``."""
    return jax.lax.dot_general(
        a,
        b,
        (contract, ((), ())),
        preferred_element_type=jnp.float32,
        precision=spec.precision if a.dtype == jnp.float32 else None,
    )


def _row_product(q32, table_ref, r):
    """``[TQ, 1]``: ``q · table[r]`` (row ``r`` of a ref, ``r`` static or traced)."""
    return jnp.sum(q32 * table_ref[pl.ds(r, 1), :].astype(jnp.float32), axis=1, keepdims=True)


def _relative_term(s, q32, selector, table_ref, count: int):
    """``s`` plus, for each table row ``r < count``, ``q · table[r]`` where the selector is
    ``r`` (a loop, so the kernel's size does not grow with the window)."""

    def add_row(r, s):
        return s + jnp.where(selector == r, _row_product(q32, table_ref, r), 0.0)

    return jax.lax.fori_loop(0, count, add_row, s)


def _logits(q, k, rsel, csel, rr_ref, rc_ref, spec: KernelSpec):
    """``[TQ, M]`` float32 logits, ``MASKED`` outside each query's softmax."""
    if spec.has_key:
        s = _dot(q, k, spec)
    else:
        s = jnp.zeros(rsel.shape, jnp.float32)
    if spec.has_rel:
        q32 = q.astype(jnp.float32)
        s = _relative_term(s, q32, rsel, rr_ref, spec.rel_rows)
        s = _relative_term(s, q32, csel, rc_ref, spec.rel_cols)
    return jnp.where((rsel >= 0) & (csel >= 0), s, MASKED)


def _unpack(refs, spec: KernelSpec, inputs: tuple[str, ...]):
    """Names the refs: ``inputs`` in order (``k`` and the tables only when present), then the
    outputs."""
    refs = list(refs)
    named = {}
    for name in inputs:
        if name == "k" and not spec.has_key:
            continue
        if name in ("rr", "rc") and not spec.has_rel:
            continue
        named[name] = refs.pop(0)
    return named, refs


def forward_kernel(*refs, spec: KernelSpec):
    """Refs: q ``[1, 1, TQ, C]``, k ``[1, 1, M, C]``, v ``[1, 1, M, E]``, row and column
    selectors ``[1, TQ, M]``, tables ``[LR, C]``, ``[LC, C]``; out ``[1, 1, TQ, E]`` and
    log-sum-exp ``[1, 1, TQ, 1]``."""
    ins, (o_ref, lse_ref) = _unpack(refs, spec, ("q", "k", "v", "rsel", "csel", "rr", "rc"))
    q = ins["q"][0, 0]
    k = ins["k"][0, 0] if spec.has_key else None
    v = ins["v"][0, 0]
    s = _logits(q, k, ins["rsel"][0], ins["csel"][0], ins.get("rr"), ins.get("rc"), spec)
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=1, keepdims=True)
    out = _dot(p.astype(v.dtype), v, spec, contract=((1,), (0,)))
    o_ref[0, 0] = (out / total).astype(o_ref.dtype)
    lse_ref[0, 0] = m + jnp.log(total)


def backward_kernel(*refs, spec: KernelSpec):
    """Refs: the forward's inputs, then dO ``[1, 1, TQ, E]``, the log-sum-exp and
    ``delta = sum(dO * O)`` ``[1, 1, TQ, 1]``; outputs dq ``[1, 1, TQ, C]``, dk ``[1, 1, M,
    C]`` (when there are keys), dv ``[1, 1, M, E]`` and the tables' gradients ``[1, 1, LR,
    C]``, ``[1, 1, LC, C]`` (when there are tables). Accumulated in float32; each output is
    written in its ref's dtype (the caller's choice: float32 where halos add up)."""
    names = ("q", "k", "v", "rsel", "csel", "rr", "rc", "do", "lse", "delta")
    ins, outs = _unpack(refs, spec, names)
    dq_ref = outs.pop(0)
    dk_ref = outs.pop(0) if spec.has_key else None
    dv_ref = outs.pop(0)
    q = ins["q"][0, 0]
    k = ins["k"][0, 0] if spec.has_key else None
    v = ins["v"][0, 0]
    d_out = ins["do"][0, 0]
    rsel, csel = ins["rsel"][0], ins["csel"][0]
    s = _logits(q, k, rsel, csel, ins.get("rr"), ins.get("rc"), spec)
    p = jnp.exp(s - ins["lse"][0, 0])
    dp = _dot(d_out, v, spec)
    ds = p * (dp - ins["delta"][0, 0])
    if spec.has_key:
        dq = _dot(ds.astype(k.dtype), k, spec, contract=((1,), (0,)))
        dk = _dot(ds.astype(q.dtype), q, spec, contract=((0,), (0,)))
        dk_ref[0, 0] = dk.astype(dk_ref.dtype)
    else:
        dq = jnp.zeros(q.shape, jnp.float32)
    dv = _dot(p.astype(d_out.dtype), d_out, spec, contract=((0,), (0,)))
    dv_ref[0, 0] = dv.astype(dv_ref.dtype)
    if spec.has_rel:
        q32 = q.astype(jnp.float32)
        for sel, table_ref, grad_ref, count in (
            (rsel, ins["rr"], outs[0], spec.rel_rows),
            (csel, ins["rc"], outs[1], spec.rel_cols),
        ):
            grad_ref[0, 0] = jnp.zeros(grad_ref.shape[2:], jnp.float32)  # padding rows too

            def table_row(r, dq, sel=sel, table_ref=table_ref, grad_ref=grad_ref):
                weight = jnp.sum(jnp.where(sel == r, ds, 0.0), axis=1, keepdims=True)
                row = table_ref[pl.ds(r, 1), :].astype(jnp.float32)
                grad_ref[0, 0, pl.ds(r, 1), :] = jnp.sum(weight * q32, axis=0, keepdims=True)
                return dq + weight * row

            dq = jax.lax.fori_loop(0, count, table_row, dq)
    dq_ref[0, 0] = dq.astype(dq_ref.dtype)
