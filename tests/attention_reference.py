"""An independent reference for ``local_attention``, written from the contract in the README.

It shares no code with the package. Window membership is computed by Python loops straight
from the contract's formulas; the attention itself is a *dense* masked attention over every
pixel of the image, plus one "virtual" key per out-of-image window tap (for border "zeros"),
whose logit is only the relative term and whose value is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def tap_positions(size: int, window: int, dilation: int, border: str):
    """Per query ``i`` and tap ``t``: (position, relative-table index), from the contract."""
    result = np.zeros((size, window, 2), dtype=np.int64)
    for i in range(size):
        for t in range(window):
            if border == "clamp":
                first = min(max(i - window // 2, 0), size - window)
                a = first + t
                rel = (a - i) + (2 * window - 1) // 2
            else:
                a = i + dilation * (t - window // 2)
                rel = (a - i) // dilation + window // 2
            result[i, t] = (a, rel)
    return result


def membership(height, width, window, dilation, border):
    """One-hot tables that place each window tap of each query.

    Returns a dict of float arrays, with P = height*width queries and keys and T = kh*kw taps:
      inside [P, P]: key pixel is in the query's window;
      rows_in [P, P, Lr], cols_in [P, P, Lc]: relative-table rows of in-image keys;
      outside [P, T]: tap lies outside the image (only counted under "zeros");
      rows_out [P, T, Lr], cols_out [P, T, Lc]: relative-table rows of those taps;
      tap_of_key [P, T, P], tap_is_out [P, T, T]: map dense weights back to window order.
    """
    kh, kw = window
    lr = 2 * kh - 1 if border == "clamp" else kh
    lc = 2 * kw - 1 if border == "clamp" else kw
    rows = tap_positions(height, kh, dilation, border)
    cols = tap_positions(width, kw, dilation, border)
    p, t_count = height * width, kh * kw
    m = {
        "inside": np.zeros((p, p)),
        "rows_in": np.zeros((p, p, lr)),
        "cols_in": np.zeros((p, p, lc)),
        "outside": np.zeros((p, t_count)),
        "rows_out": np.zeros((p, t_count, lr)),
        "cols_out": np.zeros((p, t_count, lc)),
        "tap_of_key": np.zeros((p, t_count, p)),
        "tap_is_out": np.zeros((p, t_count, t_count)),
    }
    for i in range(height):
        for j in range(width):
            query = i * width + j
            for t in range(kh):
                for u in range(kw):
                    a, ra = rows[i, t]
                    b, cb = cols[j, u]
                    tap = t * kw + u
                    if 0 <= a < height and 0 <= b < width:
                        key = a * width + b
                        assert m["inside"][query, key] == 0, "a pixel twice in one window"
                        m["inside"][query, key] = 1
                        m["rows_in"][query, key, ra] = 1
                        m["cols_in"][query, key, cb] = 1
                        m["tap_of_key"][query, tap, key] = 1
                    elif border == "zeros":
                        m["outside"][query, tap] = 1
                        m["rows_out"][query, tap, ra] = 1
                        m["cols_out"][query, tap, cb] = 1
                        m["tap_is_out"][query, tap, tap] = 1
    return m


def reference_attention(q, k, v, *, window, rel_row=None, rel_col=None, dilation=1, border="mask"):
    """Dense masked local attention. Returns (out [b,h,w,n,dv], weights [b,h,w,n,kh*kw]).
    ``k=None``: no content logits (the contract's q·r alone), i.e. every key is zero."""
    k = jnp.zeros_like(q) if k is None else k
    window = (window, window) if isinstance(window, int) else tuple(window)
    b, h, w, n, d = q.shape
    m = {
        key: jnp.asarray(val, jnp.float32)
        for key, val in membership(h, w, window, dilation, border).items()
    }
    qf = q.astype(jnp.float32).reshape(b, h * w, n, d)
    kf = k.astype(jnp.float32).reshape(b, h * w, n, d)
    vf = v.astype(jnp.float32).reshape(b, h * w, n, v.shape[-1])
    hp = jax.lax.Precision.HIGHEST
    logits_in = jnp.einsum("bpnd,bqnd->bnpq", qf, kf, precision=hp)
    logits_out = jnp.zeros((b, n, h * w, window[0] * window[1]))
    if rel_row is not None:
        qr = jnp.einsum(
            "bpnd,rd->bnpr", qf[..., : d // 2], rel_row.astype(jnp.float32), precision=hp
        )
        qc = jnp.einsum(
            "bpnd,cd->bnpc", qf[..., d // 2 :], rel_col.astype(jnp.float32), precision=hp
        )
        logits_in += jnp.einsum("bnpr,pqr->bnpq", qr, m["rows_in"], precision=hp)
        logits_in += jnp.einsum("bnpc,pqc->bnpq", qc, m["cols_in"], precision=hp)
        logits_out += jnp.einsum("bnpr,ptr->bnpt", qr, m["rows_out"], precision=hp)
        logits_out += jnp.einsum("bnpc,ptc->bnpt", qc, m["cols_out"], precision=hp)
    logits = jnp.concatenate(
        [
            jnp.where(m["inside"] > 0, logits_in, -jnp.inf),
            jnp.where(m["outside"] > 0, logits_out, -jnp.inf),
        ],
        axis=-1,
    )
    probs = jax.nn.softmax(logits, axis=-1)
    probs_in, probs_out = probs[..., : h * w], probs[..., h * w :]
    out = jnp.einsum("bnpq,bqne->bpne", probs_in, vf, precision=hp)  # virtual values are 0
    taps = jnp.einsum("bnpq,ptq->bnpt", probs_in, m["tap_of_key"], precision=hp)
    taps += jnp.einsum("bnps,pts->bnpt", probs_out, m["tap_is_out"], precision=hp)
    out = out.reshape(b, h, w, n, -1)
    weights = jnp.transpose(taps, (0, 2, 1, 3)).reshape(b, h, w, n, -1)
    return out, weights


def reference_block_attention(q, k, v, rel_row, rel_col, block):
    """Dense attention inside each ``block x block`` tile, written out from the contract of
    ``block_attention``: query (a, b) and key (c, e) of one tile meet with the logit
    ``q . k + q_row . rel_row[c - a + block - 1] + q_col . rel_col[e - b + block - 1]``
    (no relative term without tables). Returns ``(out [b, H, W, n, dv], weights [tiles,
    block, block, n, block*block])``."""
    b, h, w, n, d = q.shape
    s = block

    def tiles(t):  # [b, H, W, n, x] -> [b, H/s, W/s, n, s*s, x]
        t = t.reshape(b, h // s, s, w // s, s, n, -1).transpose(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(b, h // s, w // s, n, s * s, -1)

    qt, kt, vt = tiles(q), tiles(jnp.zeros_like(q) if k is None else k), tiles(v)
    logits = jnp.einsum("...pd,...qd->...pq", qt, kt)
    if rel_row is not None:
        rows, cols = np.divmod(np.arange(s * s), s)
        dr = rows[None, :] - rows[:, None] + s - 1  # [query, key] index into the tables
        dc = cols[None, :] - cols[:, None] + s - 1
        logits += jnp.einsum("...pd,pqd->...pq", qt[..., : d // 2], rel_row[dr])
        logits += jnp.einsum("...pd,pqd->...pq", qt[..., d // 2 :], rel_col[dc])
    weights = jax.nn.softmax(logits, -1)  # [b, H/s, W/s, n, s*s (query), s*s (key)]
    out = jnp.einsum("...pq,...qe->...pe", weights, vt)
    out = out.reshape(b, h // s, w // s, n, s, s, -1).transpose(0, 1, 4, 2, 5, 3, 6)
    weights = weights.reshape(b, h // s, w // s, n, s, s, s * s).transpose(0, 1, 2, 4, 5, 3, 6)
    return out.reshape(b, h, w, n, -1), weights.reshape(-1, s, s, n, s * s)


def reference_attention_np(q, k, v, rel_row, rel_col, *, window, dilation, border, c_out, c_w):
    """The contract straight from the README in float64 NumPy, with its gradients written out.

    Loops over every query and every tap of its window (from ``tap_positions``). A tap inside
    the image reads that pixel's key and value; a tap outside is left out under "mask" and is a
    zero key and value under "zeros". Returns ``(out, weights, grads)``: the output
    ``[b,h,w,n,dv]``, the weights ``[b,h,w,n,kh*kw]`` (0 for taps out of the softmax), and the
    gradients of ``sum(out * c_out) + sum(weights * c_w)`` with respect to ``(q, k, v,
    rel_row, rel_col)`` (None where the argument is None; ``k=None`` means zero keys).
    """
    q, v = np.asarray(q, np.float64), np.asarray(v, np.float64)
    k = np.zeros_like(q) if k is None else np.asarray(k, np.float64)
    has_rel = rel_row is not None
    if has_rel:
        rel_row, rel_col = np.asarray(rel_row, np.float64), np.asarray(rel_col, np.float64)
    c_out, c_w = np.asarray(c_out, np.float64), np.asarray(c_w, np.float64)
    kh, kw = (window, window) if isinstance(window, int) else window
    b, height, width, n, d = q.shape
    half = d // 2
    rows = tap_positions(height, kh, dilation, border)
    cols = tap_positions(width, kw, dilation, border)
    out = np.zeros(v.shape)
    weights = np.zeros((b, height, width, n, kh * kw))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    d_row = np.zeros(rel_row.shape) if has_rel else None
    d_col = np.zeros(rel_col.shape) if has_rel else None
    for i in range(height):
        for j in range(width):
            taps = []  # (tap index, key row or None, key column, rel row, rel column)
            for t in range(kh):
                for u in range(kw):
                    (a, ra), (c, rc) = rows[i, t], cols[j, u]
                    inside = 0 <= a < height and 0 <= c < width
                    if inside or border == "zeros":
                        taps.append((t * kw + u, (a, c) if inside else None, ra, rc))
            qi = q[:, i, j]  # [b, n, d]
            logits = []
            for _, key, ra, rc in taps:
                logit = np.zeros((b, n))
                if key is not None:
                    logit += np.sum(qi * k[:, key[0], key[1]], axis=-1)
                if has_rel:
                    logit += qi[..., :half] @ rel_row[ra] + qi[..., half:] @ rel_col[rc]
                logits.append(logit)
            logits = np.stack(logits, axis=-1)  # [b, n, taps]
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            d_p = np.zeros_like(p)
            for x, (tap, key, _, _) in enumerate(taps):
                weights[:, i, j, :, tap] = p[..., x]
                d_p[..., x] = c_w[:, i, j, :, tap]
                if key is not None:
                    value = v[:, key[0], key[1]]
                    out[:, i, j] += p[..., x, None] * value
                    d_p[..., x] += np.sum(c_out[:, i, j] * value, axis=-1)
                    dv[:, key[0], key[1]] += p[..., x, None] * c_out[:, i, j]
            d_logit = p * (d_p - np.sum(p * d_p, axis=-1, keepdims=True))
            for x, (_, key, ra, rc) in enumerate(taps):
                g = d_logit[..., x, None]  # [b, n, 1]
                if key is not None:
                    dq[:, i, j] += g * k[:, key[0], key[1]]
                    dk[:, key[0], key[1]] += g * qi
                if has_rel:
                    dq[:, i, j, :, :half] += g * rel_row[ra]
                    dq[:, i, j, :, half:] += g * rel_col[rc]
                    d_row[ra] += np.sum(g * qi[..., :half], axis=(0, 1))
                    d_col[rc] += np.sum(g * qi[..., half:], axis=(0, 1))
    return out, weights, (dq, dk, dv, d_row, d_col)


def reference_block_attention_np(q, k, v, rel_row, rel_col, block, *, c_out, c_w):
    """``block_attention`` from its contract, in float64 NumPy: ``reference_attention_np``
    with a "clamp" window of ``block`` on each ``block x block`` tile as an image of its own.
    ``c_w`` is ``[tiles, block, block, heads, block*block]``, tiles in row-major order. Returns
    ``(out, weights, grads)`` as ``reference_attention_np`` does, on the whole map."""
    b, h, w, n = np.shape(q)[:4]
    s = block

    def tiles(x):  # [b, H, W, n, c] -> [b*(H/s)*(W/s), s, s, n, c]
        x = np.asarray(x, np.float64).reshape(b, h // s, s, w // s, s, n, -1)
        return x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(-1, s, s, n, x.shape[-1])

    def untile(x):
        x = x.reshape(b, h // s, w // s, s, s, n, -1).transpose(0, 1, 3, 2, 4, 5, 6)
        return x.reshape(b, h, w, n, -1)

    out, weights, (dq, dk, dv, d_row, d_col) = reference_attention_np(
        tiles(q),
        None if k is None else tiles(k),
        tiles(v),
        rel_row,
        rel_col,
        window=s,
        dilation=1,
        border="clamp",
        c_out=tiles(c_out),
        c_w=c_w,
    )
    return untile(out), weights, (untile(dq), untile(dk), untile(dv), d_row, d_col)


def random_inputs(seed, image, window, border, rel, batch=2, heads=2, dim=4, dim_v=3):
    """q, k (None for "qr"), v and the tables ({} for "norel"), float32 NumPy arrays."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    h, w = image
    kh, kw = (window, window) if isinstance(window, int) else window
    q, k = normal(batch, h, w, heads, dim), normal(batch, h, w, heads, dim)
    v = normal(batch, h, w, heads, dim_v)
    tables = {}
    if rel != "norel":
        lr, lc = (2 * kh - 1, 2 * kw - 1) if border == "clamp" else (kh, kw)
        tables = {"rel_row": normal(lr, dim // 2), "rel_col": normal(lc, dim // 2)}
    return q, None if rel == "qr" else k, v, tables


def stem_arrays(image, cin, width, heads, block, *, batch=2, seed=0):
    """Random float32 inputs of the attention stem with its projections (``x``, ``wq``,
    ``wk``, ``wv``, the two tables) and an output cotangent."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    c = width // heads
    x = normal(batch, *image, cin)
    wq, wk = normal(cin, width, scale=0.7), normal(cin, width, scale=0.7)
    wv = normal(block * block * cin, width, scale=0.7)
    tables = normal(2 * block - 1, c // 2), normal(2 * block - 1, c // 2)
    return x, wq, wk, wv, *tables, normal(batch, *image, width)


def reference_stem_attention_np(x, wq, wk, wv, rel_row, rel_col, c_out, heads, block):
    """The attention stem with its projections, in float64: its output and the gradients of
    ``sum(out * c_out)`` for (x, wq, wk, wv, tables). q (scaled by ``c^-1/2``), k and each
    position's value projected in NumPy, attention and its q/k/v gradients from the per-tile
    reference, then the projections' chain rule."""
    x, wq, wk, wv = (np.asarray(a, np.float64) for a in (x, wq, wk, wv))
    b, h, w, cin = x.shape
    width = wq.shape[1]
    c = width // heads
    scale = c**-0.5
    position = (np.arange(h)[:, None] % block) * block + np.arange(w)[None, :] % block
    per_pixel = wv.reshape(block * block, cin, width)[position]  # [H, W, cin, width]
    q, k = scale * x @ wq, x @ wk
    v = np.einsum("bhwi,hwio->bhwo", x, per_pixel)
    split = [a.reshape(b, h, w, heads, c) for a in (q, k, v, c_out)]
    tiles = b * (h // block) * (w // block)
    c_w = np.zeros((tiles, block, block, heads, block * block))
    out, _, (dq, dk, dv, d_row, d_col) = reference_block_attention_np(
        *split[:3], rel_row, rel_col, block, c_out=split[3], c_w=c_w
    )
    dq, dk, dv = (g.reshape(b, h, w, width) for g in (dq, dk, dv))
    dx = scale * dq @ wq.T + dk @ wk.T + np.einsum("bhwo,hwio->bhwi", dv, per_pixel)
    dwq = scale * np.einsum("bhwi,bhwo->io", x, dq)
    dwk = np.einsum("bhwi,bhwo->io", x, dk)
    d_per_pixel = np.einsum("bhwi,bhwo->hwio", x, dv)
    dwv = np.zeros((block * block, cin, width))
    np.add.at(dwv, position.reshape(-1), d_per_pixel.reshape(h * w, cin, width))
    grads = (dx, dwq, dwk, dwv.reshape(-1, width), d_row, d_col)
    return out.reshape(b, h, w, width), grads


def assert_stem_vmap_is_per_slice(stem_fn, arrays, heads, block):
    """Under ``jax.vmap`` over a leading axis of the input (``x`` and ``2x`` of ``arrays``,
    ``stem_arrays``' tuple), ``stem_fn``'s loss ``sum(out**2)`` and its gradient for ``W_Q``
    equal those of a call on each slice alone: the reference for vmap is the unbatched call."""
    x, wq, wk, wv, rel_row, rel_col, _ = arrays
    stacked = np.stack([x, 2 * x])

    def loss(x, wq):
        out = stem_fn(x, wq, wk, wv, rel_row, rel_col, heads=heads, block=block)
        return jnp.sum(out**2)

    mapped = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=1), in_axes=(0, None)))
    values, grads = mapped(stacked, wq)
    for index in range(2):
        value, grad = jax.jit(jax.value_and_grad(loss, argnums=1))(stacked[index], wq)
        np.testing.assert_allclose(values[index], value, rtol=1e-6)
        np.testing.assert_allclose(grads[index], grad, rtol=1e-5, atol=1e-6)
