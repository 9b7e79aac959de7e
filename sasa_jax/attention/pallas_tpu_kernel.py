"""The Mosaic TPU kernels of the "pallas" implementation: one tile of queries against its key
halo, every head of one image, with positions in the lanes.

TPU vector registers and HBM tiles are (8 sublanes x 128 lanes): an array whose last dimension
is an 8- or 16-channel head is padded 8-16x. Here every block puts positions last: a query
tile is ``[heads, C, TQ]`` (``TQ`` queries, a multiple of 128) and a halo ``[heads, C, M]``,
so the channels sit in sublanes and nothing is padded but the positions. The logits of one head
are ``[M, TQ]`` (keys in sublanes, queries in lanes), so each query's softmax reduces along
sublanes and its statistics are lane-dense rows ``[1, TQ]``:

- ``sᵀ = kᵀ q`` as one matmul (float32 accumulation), plus the relative term: for each table
  row ``r`` (a static loop), the row ``(tableᵀ q)[r]`` where the selector is ``r``;
- the softmax in float32, the output ``v pᵀ`` as one matmul ``[E, TQ]``, and the log-sum-exp.

Every slice is static, so Mosaic sees only aligned accesses (a traced row index into a bf16
table cannot be proven aligned to the 16-row bf16 tile). The backward kernel recomputes the
weights from the log-sum-exp and returns ``dq`` for the tile, ``dk`` and ``dv`` for the halo
(the caller adds the halos up) and the tile's share of the tables' gradients, summed over the
heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# The logit of a key outside a query's softmax (finite: exp(logit - max) is exactly 0).
MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """What the TPU kernels are compiled for (static).

    Attributes:
      heads: heads per image (a static loop in every program).
      has_key, has_rel: q·k logits; relative tables.
      rel_rows, rel_cols: the tables' lengths.
      precision: of the float32 matmuls (HIGHEST: exact float32, no bf16 passes).
    """

    heads: int
    has_key: bool
    has_rel: bool
    rel_rows: int
    rel_cols: int
    precision: jax.lax.Precision | None


def _dot(a, b, contract, spec: TpuSpec):
    """A 2-D matmul with float32 accumulation; ``contract`` as in ``dot_general``."""
    return jax.lax.dot_general(
        a,
        b,
        (contract, ((), ())),
        preferred_element_type=jnp.float32,
        precision=spec.precision if a.dtype == jnp.float32 else None,
    )


# ``contract`` for the three matmul shapes: A·B, Aᵀ·B, A·Bᵀ.
AB, ATB, ABT = ((1,), (0,)), ((0,), (0,)), ((1,), (1,))


def _relative(s, q, selector, table, count: int, spec: TpuSpec):
    """``s`` ``[M, TQ]`` plus, where ``selector == r``, the row ``r`` of ``tableᵀ q``
    (``table`` ``[C, L]``, ``q`` ``[C, TQ]``)."""
    rows = _dot(table.astype(q.dtype), q, ATB, spec)  # [L, TQ]
    for r in range(count):
        s = s + jnp.where(selector == r, rows[r : r + 1, :], 0.0)
    return s


def _logits(q, k, rsel, csel, trow, tcol, spec: TpuSpec):
    """``[M, TQ]`` float32 logits of one head, ``MASKED`` outside each query's softmax."""
    if spec.has_key:
        s = _dot(k, q, ATB, spec)
    else:
        s = jnp.zeros(rsel.shape, jnp.float32)
    if spec.has_rel:
        s = _relative(s, q, rsel, trow, spec.rel_rows, spec)
        s = _relative(s, q, csel, tcol, spec.rel_cols, spec)
    return jnp.where((rsel >= 0) & (csel >= 0), s, MASKED)


def _unpack(refs, spec: TpuSpec, names: tuple[str, ...]):
    """The refs by name (``k`` and the tables only when present), then the outputs."""
    refs = list(refs)
    named = {}
    for name in names:
        if (name == "k" and not spec.has_key) or (name in ("rr", "rc") and not spec.has_rel):
            continue
        named[name] = refs.pop(0)
    return named, refs


def _tables(ins, spec: TpuSpec):
    if not spec.has_rel:
        return None, None
    return ins["rr"][...].astype(jnp.float32), ins["rc"][...].astype(jnp.float32)


def _head(ins, h, rsel, csel, trow, tcol, spec: TpuSpec):
    """Head ``h``'s q ``[C, TQ]``, k ``[C, M]`` (None without keys), v ``[E, M]`` and its
    logits ``[M, TQ]`` (float32)."""
    q = ins["q"][0, 0, h]
    k = ins["k"][0, 0, h] if spec.has_key else None
    v = ins["v"][0, 0, h]
    return q, k, v, _logits(q, k, rsel, csel, trow, tcol, spec)


FORWARD_INPUTS = ("q", "k", "v", "rsel", "csel", "rr", "rc")


def forward_kernel(*refs, spec: TpuSpec):
    """Refs: q ``[1, 1, n, C, TQ]``, k ``[1, 1, n, C, M]``, v ``[1, 1, n, E, M]``, row and
    column selectors ``[1, M, TQ]``, tables ``[C, LR]``, ``[C, LC]``; out ``[1, 1, n, E, TQ]``
    and the log-sum-exp ``[1, 1, n, TQ]``. A loop over the heads (not unrolled: the kernel's
    code stays the size of one head's)."""
    ins, (o_ref, lse_ref) = _unpack(refs, spec, FORWARD_INPUTS)
    rsel, csel = ins["rsel"][0], ins["csel"][0]
    trow, tcol = _tables(ins, spec)

    def head(h, carry):
        q, k, v, s = _head(ins, h, rsel, csel, trow, tcol, spec)
        m = jnp.max(s, axis=0, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=0, keepdims=True)
        out = _dot(v, p.astype(v.dtype), AB, spec)  # [E, TQ]
        o_ref[0, 0, h] = (out / total).astype(o_ref.dtype)
        lse_ref[0, 0, pl.ds(h, 1), :] = m + jnp.log(total)
        return carry

    jax.lax.fori_loop(0, spec.heads, head, 0)


BACKWARD_INPUTS = (*FORWARD_INPUTS, "do", "lse", "delta")


def _table_gradients(q, ds, sel, table, count: int, spec: TpuSpec):
    """One table's share of ``dq`` ``[C, TQ]`` and its gradient ``[C, L]``: the weights
    ``[L, TQ]`` sum ``ds`` over the keys each table row ``r`` reaches."""
    rows = [jnp.sum(jnp.where(sel == r, ds, 0.0), axis=0, keepdims=True) for r in range(count)]
    weights = jnp.concatenate(rows, axis=0)
    return _dot(table, weights, AB, spec), _dot(q.astype(jnp.float32), weights, ABT, spec)


def backward_kernel(*refs, spec: TpuSpec):
    """Refs: the forward's inputs, then dO ``[1, 1, n, E, TQ]``, the log-sum-exp and
    ``delta = sum(dO * O)`` ``[1, 1, n, TQ]``; outputs (float32) dq ``[1, 1, n, C, TQ]``, dk
    ``[1, 1, n, C, M]`` (when there are keys), dv ``[1, 1, n, E, M]`` and, with tables, their
    gradients summed over the tile's queries and heads ``[1, 1, C, LR]``, ``[1, 1, C, LC]``.
    dq, and dk and dv where halos do not overlap, may be of the inputs' dtype instead."""
    ins, outs = _unpack(refs, spec, BACKWARD_INPUTS)
    dq_ref = outs.pop(0)
    dk_ref = outs.pop(0) if spec.has_key else None
    dv_ref = outs.pop(0)
    rsel, csel = ins["rsel"][0], ins["csel"][0]
    trow, tcol = _tables(ins, spec)

    def head(h, d_tables):
        q, k, v, s = _head(ins, h, rsel, csel, trow, tcol, spec)
        d_out = ins["do"][0, 0, h]
        p = jnp.exp(s - ins["lse"][0, 0, pl.ds(h, 1), :])
        dp = _dot(v, d_out, ATB, spec)  # [M, TQ]
        ds = p * (dp - ins["delta"][0, 0, pl.ds(h, 1), :])
        if spec.has_key:
            dq = _dot(k, ds.astype(k.dtype), AB, spec)  # [C, TQ]
            dk_ref[0, 0, h] = _dot(q, ds.astype(q.dtype), ABT, spec).astype(dk_ref.dtype)
        else:
            dq = jnp.zeros(q.shape, jnp.float32)
        dv_ref[0, 0, h] = _dot(d_out, p.astype(d_out.dtype), ABT, spec).astype(dv_ref.dtype)
        if spec.has_rel:
            dq_row, d_row = _table_gradients(q, ds, rsel, trow, spec.rel_rows, spec)
            dq_col, d_col = _table_gradients(q, ds, csel, tcol, spec.rel_cols, spec)
            dq = dq + dq_row + dq_col
            d_tables = (d_tables[0] + d_row, d_tables[1] + d_col)
        dq_ref[0, 0, h] = dq.astype(dq_ref.dtype)
        return d_tables

    channels = ins["q"].shape[3]
    zeros = (
        jnp.zeros((channels, spec.rel_rows), jnp.float32),
        jnp.zeros((channels, spec.rel_cols), jnp.float32),
    )
    d_row, d_col = jax.lax.fori_loop(0, spec.heads, head, zeros)
    if spec.has_rel:
        outs[0][0, 0] = d_row
        outs[1][0, 0] = d_col
