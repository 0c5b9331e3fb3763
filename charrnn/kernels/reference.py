"""Plain-numpy reference twin of every kernel: the truth the fast kernels are tested against.

Every function here works in float32 and float64 alike, writes its results into the output
arrays it is given (kernels allocate nothing), and has a numba twin with the same name and
argument order in `cpu.py` (and `cuda.py`).

Cell maths follow PyTorch exactly (nn.LSTM gate order i, f, g, o; nn.GRU r, z, n with b_hn
inside the reset product; nn.RNN tanh). Each step receives the input projection `xp`
(x @ W_ih.T + b_ih, computed for the whole window at once) and the raw recurrent product
`hp` (h_prev @ W_hh.T, one GEMM per step), and adds `b_hh` itself so GRU can keep b_hn
inside r * (.).

Dimension letters: B=batch, H=hidden, G=gate blocks (4 LSTM, 3 GRU, 1 RNN), V=vocab,
N=rows (T*B flattened), T=time, D=columns of a gathered table row.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(x):
    # Split by sign so exp never overflows (float32 exp(89) is inf).
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


# ---------------------------------------------------------------- LSTM


def lstm_forward_step(xp, hp, b_hh, c_prev, act, c, h):
    """xp, hp (B,4H); b_hh (4H,); c_prev (B,H) -> act (B,4H) = [i,f,g,o] activated, c, h (B,H).
    act may be xp itself (overwritten in place); so in every step kernel, an output of gate
    width may be the input it replaces."""
    H = c.shape[1]
    pre = xp + hp + b_hh  # (B,4H)
    act[:, : 2 * H] = _sigmoid(pre[:, : 2 * H])  # i, f
    act[:, 2 * H : 3 * H] = np.tanh(pre[:, 2 * H : 3 * H])  # g
    act[:, 3 * H :] = _sigmoid(pre[:, 3 * H :])  # o
    i, f, g, o = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    c[...] = f * c_prev + i * g
    h[...] = o * np.tanh(c)


def lstm_states_from_gates(act, c0, cs, hs):
    """act (T,B,4H) activated gates; c0 (B,H) -> cs, hs (T,B,H): the states the forward
    computed from those gates, by lstm_forward_step's own expressions (so the same bits)."""
    H = cs.shape[2]
    for t in range(act.shape[0]):
        a = act[t]
        i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
        c_prev = c0 if t == 0 else cs[t - 1]
        cs[t] = f * c_prev + i * g
        hs[t] = o * np.tanh(cs[t])


def lstm_backward_step(act, c_prev, c, dh, dc, dpre):
    """act (B,4H); c_prev, c (B,H); dh (B,H): dL/dh_t in full.
    dc (B,H): in = dL/dc_t from step t+1, out = dL/dc_{t-1} (updated in place).
    dpre (B,4H) out: dL/d(pre-activation), which is both dL/dxp and dL/dhp."""
    H = c.shape[1]
    i, f, g, o = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    tc = np.tanh(c)
    dct = dc + dh * o * (1.0 - tc * tc)
    # Every block computed before any is written: dpre may be act itself (host backends
    # overwrite a step's activations with its gradients).
    blocks = (dct * g * i * (1.0 - i), dct * c_prev * f * (1.0 - f), dct * i * (1.0 - g * g),
              dh * tc * o * (1.0 - o))
    dc[...] = dct * f
    for k, blk in enumerate(blocks):
        dpre[:, k * H : (k + 1) * H] = blk


# ---------------------------------------------------------------- GRU


def gru_forward_step(xp, hp, b_hh, h_prev, act, hn, h):
    """xp, hp (B,3H); b_hh (3H,); h_prev (B,H) -> act (B,3H) = [r,z,n], hn (B,H) = W_hn h + b_hn, h (B,H)."""
    H = h.shape[1]
    hpb = hp + b_hh  # (B,3H)
    act[:, : 2 * H] = _sigmoid(xp[:, : 2 * H] + hpb[:, : 2 * H])  # r, z
    r, z = act[:, :H], act[:, H : 2 * H]
    hn[...] = hpb[:, 2 * H :]
    act[:, 2 * H :] = np.tanh(xp[:, 2 * H :] + r * hn)
    n = act[:, 2 * H :]
    h[...] = (1.0 - z) * n + z * h_prev


def gru_states_from_gates(act, h0, hs):
    """act (T,B,3H) activated gates; h0 (B,H) -> hs (T,B,H) by gru_forward_step's expression."""
    H = hs.shape[2]
    for t in range(act.shape[0]):
        z, n = act[t][:, H : 2 * H], act[t][:, 2 * H :]
        h_prev = h0 if t == 0 else hs[t - 1]
        hs[t] = (1.0 - z) * n + z * h_prev


def gru_backward_step(act, hn, h_prev, dh, dxp, dhp, dh_prev):
    """act (B,3H); hn, h_prev, dh (B,H) -> dxp (B,3H) = dL/dxp, dhp (B,3H) = dL/dhp (b_hh included),
    dh_prev (B,H) = the direct path z * dh (the W_hh path is added by the caller)."""
    H = dh.shape[1]
    r, z, n = act[:, :H], act[:, H : 2 * H], act[:, 2 * H :]
    dn = dh * (1.0 - z) * (1.0 - n * n)  # through tanh
    dr = dn * hn * r * (1.0 - r)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    # act is read in full before dxp is written: dxp may be act itself.
    dhp[:, :H] = dr
    dhp[:, H : 2 * H] = dz
    dhp[:, 2 * H :] = dn * r
    dh_prev[...] = dh * z
    dxp[:, :H] = dr
    dxp[:, H : 2 * H] = dz
    dxp[:, 2 * H :] = dn


# ---------------------------------------------------------------- vanilla RNN (tanh)


def rnn_forward_step(xp, hp, b_hh, h):
    """xp, hp (B,H); b_hh (H,) -> h (B,H) = tanh(xp + hp + b_hh)."""
    h[...] = np.tanh(xp + hp + b_hh)


def rnn_backward_step(h, dh, dpre):
    """h, dh (B,H) -> dpre (B,H) = dL/d(pre-activation) = dL/dxp = dL/dhp."""
    dpre[...] = dh * (1.0 - h * h)


# ---------------------------------------------------------------- embedding table


def gather_rows(table, ids, out):
    """table (V,D); ids (N,) int -> out (N,D) = table[ids]."""
    out[...] = table[ids]


def scatter_add_rows(ids, d, out):
    """ids (N,) int; d (N,D) -> out (V,D) += sum of d's rows into the rows named by ids."""
    np.add.at(out, ids, d)


# ---------------------------------------------------------------- loss


def softmax_xent(logits, targets, mask, scale, dlogits):
    """logits (N,V); targets (N,) int; mask (N,) float (1 = counts) -> returns the summed loss
    sum_n mask_n * -log softmax(logits_n)[target_n]; writes dlogits (N,V) = d(scale * loss)/dlogits.
    dlogits may be the logits array itself (each row is read before it is written)."""
    m = logits.max(axis=1, keepdims=True)  # (N,1)
    e = np.exp(logits - m)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(logits.shape[0])
    nll = (np.log(s[:, 0]) + m[:, 0] - logits[rows, targets]) * mask  # (N,)
    g = e / s * (mask * scale)[:, None]
    g[rows, targets] -= mask * scale
    dlogits[...] = g
    return float(nll.sum())


def log_softmax_rows(logits, out):
    """logits (N,V) -> out (N,V) = log softmax per row (scoring and evaluation)."""
    m = logits.max(axis=1, keepdims=True)
    out[...] = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------- sampling


def sample_logits(logits, temperature, top_k, top_p, u):
    """logits (V,); temperature > 0; top_k (0 = off); top_p in (0,1] (1 = off); u uniform in [0,1).
    Returns the sampled id: inverse-CDF sampling over the kept tokens in descending probability
    order (ties broken by lower id), so every backend draws the same id for the same u."""
    order = np.argsort(-logits, kind="stable")  # descending, lower id first on ties
    z = logits[order].astype(np.float64) / temperature
    p = np.exp(z - z[0])
    keep = len(p) if top_k <= 0 else min(top_k, len(p))
    p = p[:keep]
    if top_p < 1.0:
        c = np.cumsum(p) / p.sum()
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        # (min: a top_p within an ulp of 1 can sort past the last rounded cumulative sum)
        keep = min(int(np.searchsorted(c, top_p) + 1), len(p))
        p = p[:keep]
    c = np.cumsum(p)
    j = int(np.searchsorted(c, u * c[-1], side="right"))
    return int(order[min(j, keep - 1)])


def sample_rows(logits, temperature, top_k, top_p, u, out):
    """logits (B,V); u (B,) uniforms -> out (B,) ids, each row drawn as sample_logits."""
    for b in range(logits.shape[0]):
        out[b] = sample_logits(logits[b], temperature, top_k, top_p, u[b])


def generate_ids(cell, residual, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id,
                 temperature, top_k, top_p, u, eos_id, out):
    """Batch-1 generation: feed start_id, then each sampled id, for len(u) steps.

    cell "lstm" | "gru" | "rnn"; residual: layer k >= 1 outputs h_k + its input;
    table (V,G*H) layer-0 input projections (bias_ih_l0 included); w_ih (L-1,G*H,H) and
    b_ih (L-1,G*H) for layers >= 1; w_hh (L,G*H,H); b_hh (L,G*H); dec_w (V,H); dec_b (V,);
    h (L,H) and c (L,H) (LSTM; unused otherwise) the state, updated in place; u (n,) uniforms;
    out (n,) ids, each drawn as sample_logits from logits = dec_w @ top output + dec_b.
    eos_id >= 0: sampling it resets h and c to zero before it is fed back (lines models
    start every line fresh); -1: no reset. w_ih, w_hh, dec_w may be float16 stored as their
    uint16 bits (numba has no float16 on the CPU); the arithmetic stays in h's dtype."""
    # float16 weights widened once, not in every product: numpy would convert a whole matrix
    # for each matrix-vector product (18 ms a character at 3x512, against ~2)
    w_ih, w_hh, dec_w = (w.view(np.float16).astype(h.dtype) if w.dtype == np.uint16 else
                         w.astype(h.dtype) if w.dtype == np.float16 else w
                         for w in (w_ih, w_hh, dec_w))
    L, H = h.shape
    GH = w_hh.shape[1]
    act = np.empty((1, GH), h.dtype)  # (1,G*H) activated gates (unused)
    hn = np.empty((1, H), h.dtype)  # (1,H) GRU's W_hn h + b_hn (unused)
    cur = start_id
    for t in range(u.shape[0]):
        x = None  # (H,) input of layer k >= 1
        for k in range(L):
            xp = table[cur] if k == 0 else x @ w_ih[k - 1].T + b_ih[k - 1]  # (G*H,)
            hp = h[k] @ w_hh[k].T  # (G*H,)
            h_new = np.empty((1, H), h.dtype)
            if cell == "lstm":
                c_new = np.empty((1, H), h.dtype)
                lstm_forward_step(xp[None], hp[None], b_hh[k], c[k][None], act, c_new, h_new)
                c[k] = c_new[0]
            elif cell == "gru":
                gru_forward_step(xp[None], hp[None], b_hh[k], h[k][None], act, hn, h_new)
            else:
                rnn_forward_step(xp[None], hp[None], b_hh[k], h_new)
            h[k] = h_new[0]
            x = h[k] + x if (residual and k > 0) else h[k].copy()
        logits = dec_w @ x + dec_b  # (V,)
        cur = sample_logits(logits, temperature, top_k, top_p, u[t])
        out[t] = cur
        if cur == eos_id:
            h[...] = 0
            if cell == "lstm":
                c[...] = 0


# ---------------------------------------------------------------- optimizer


def adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, l2, decay):
    """In place on p, m, v (same shape). bc1 = 1 - beta1**t, bc2 = 1 - beta2**t.
    l2: classic Adam weight decay (added to the gradient); decay: AdamW's decoupled
    decay (p *= 1 - lr*decay first). Matches torch.optim.Adam / AdamW."""
    if decay:
        p *= 1.0 - lr * decay
    gg = g + l2 * p if l2 else g
    m *= beta1
    m += (1.0 - beta1) * gg
    v *= beta2
    v += (1.0 - beta2) * gg * gg
    p -= lr * (m / bc1) / (np.sqrt(v / bc2) + eps)


def adam_update_all(ps, gs, ms, vs, lr, beta1, beta2, eps, bc1, bc2, l2s, decays):
    """adam_update of every parameter in ps, with its gradient, moments, l2 and decay at the
    same place in the other sequences (the optimizer's one call a step)."""
    for p, g, m, v, l2, decay in zip(ps, gs, ms, vs, l2s, decays, strict=True):
        adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, l2, decay)


def sum_squares(g):
    """Sum of squares of an array, accumulated in float64 (global-norm clipping)."""
    return float(np.dot(g.ravel().astype(np.float64), g.ravel().astype(np.float64)))


def sum_squares_total(arrays):
    """Sum of squares over a sequence of arrays (global-norm clipping), accumulated in float64."""
    return float(sum(sum_squares(g) for g in arrays))
