"""CudaBackend: the Backend interface on an NVIDIA GPU, with our own numba.cuda kernels.

Parameters, optimizer moments and the carried hidden state are arrays of `xp`, which on a
GPU is CuPy: the model's GEMMs (`@`) run on cuBLAS and never leave the device; the host
sees only checkpoints, logged scalars and sampled characters. Under numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1, no CuPy, no GPU) `xp` is numpy and the same kernels run on the
simulator's host-backed arrays, so the whole model is tested here on tiny shapes through
exactly these code paths.

The recurrence of one layer runs either as
  persistent=True   one cooperative launch for all T steps (kernels/cuda.py explains the
                    design); a layer whose W_hh does not fit the GPU that way falls back
                    to the per-step design, per (cell, B, H, dtype), once decided;
  persistent=False  per step one GEMM (cuBLAS) for the recurrent product plus one fused
                    element-wise kernel for all gates: HostBackend's loop on the device.
Weight gradients are one GEMM over the window either way.

Dimension letters: T=time, B=batch, H=hidden, G=gate blocks, V=vocab, N=T*B rows.
"""

from __future__ import annotations

import numpy as np

from charrnn.backend import LayerCache
from charrnn.config import GATES
from charrnn.kernels import cuda as cuda_kernels


def _array_module():
    """numpy under the simulator, CuPy on a GPU (cuBLAS for the model's GEMMs)."""
    if cuda_kernels.SIM:
        return np
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("device 'cuda' needs CuPy for its GEMMs; install it with "
                           "pip install 'charrnn[cuda]' (or use --device cpu)") from e
    return cupy


class CudaBackend:
    """Runs on the GPU (or numba's CUDA simulator); `k` is charrnn.kernels.cuda."""

    name = "cuda"

    def __init__(self, persistent: bool = True):
        self.k = cuda_kernels
        self.xp = _array_module()
        self.persistent = bool(persistent)
        # (cell, B, H, dtype) -> why the persistent kernels could not take that layer shape
        self.fallbacks: dict[tuple, str] = {}

    # -- memory ---------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def to_numpy(self, a) -> np.ndarray:
        if isinstance(a, np.ndarray) or self.xp is np:
            return np.asarray(a)
        return self.xp.asnumpy(a)

    # -- embedding table ------------------------------------------------------------
    def gather_rows(self, table, ids):
        """table (V,D); ids (N,) -> (N,D)."""
        out = self.xp.empty((ids.shape[0], table.shape[1]), table.dtype)
        self.k.gather_rows(table, ids, out)
        return out

    def scatter_add_rows(self, ids, d, rows: int):
        """ids (N,); d (N,D) -> (rows,D) with d's rows summed into the rows named by ids."""
        out = self.xp.zeros((rows, d.shape[1]), d.dtype)
        self.k.scatter_add_rows(ids, self.xp.ascontiguousarray(d), out)
        return out

    # -- loss -----------------------------------------------------------------------
    def softmax_xent(self, logits, targets, mask, scale):
        """logits (N,V); targets (N,); mask (N,) -> (summed loss, dlogits (N,V) of scale*loss)."""
        dlogits = self.xp.empty_like(logits)
        loss = self.k.softmax_xent(logits, targets, mask, scale, dlogits)
        return loss, dlogits

    def log_softmax_rows(self, logits):
        out = self.xp.empty_like(logits)
        self.k.log_softmax_rows(logits, out)
        return out

    # -- one recurrent layer over a window -------------------------------------------
    def _use_persistent(self, cell, B, H, dtype) -> bool:
        return self.persistent and (cell, B, H, np.dtype(dtype).str) not in self.fallbacks

    def layer_forward(self, cell, xp, w_hh, b_hh, h0, c0, hmask):
        """xp (T,B,G*H) input projections (b_ih included); w_hh (G*H,H); b_hh (G*H,);
        h0, c0 (B,H); hmask (B,H) or None -> hs (T,B,H), final h (B,H), final c, cache."""
        X = self.xp
        T, B, GH = xp.shape
        H = h0.shape[1]
        dt = xp.dtype
        xp = X.ascontiguousarray(xp)
        hs = X.empty((T, B, H), dt)
        act = X.empty((T, B, GH), dt) if cell != "rnn" else None
        cs = X.empty((T, B, H), dt) if cell == "lstm" else None
        hn = X.empty((T, B, H), dt) if cell == "gru" else None
        done = False
        if self._use_persistent(cell, B, H, dt):
            try:
                self.k.persistent_layer_forward(cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act,
                                                cs, hn)
                done = True
            except self.k.PersistentUnavailable as e:
                self.fallbacks[(cell, B, H, np.dtype(dt).str)] = str(e)
        if not done:
            self._forward_steps(cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn)
        cache = LayerCache(cell, h0, c0, hmask, hs, act, cs, hn)
        return hs, hs[T - 1], (cs[T - 1] if cs is not None else None), cache

    def _forward_steps(self, cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn):
        """The per-step design: one GEMM and one fused kernel per step."""
        X, k = self.xp, self.k
        T, B, GH = xp.shape
        hp = X.empty((B, GH), xp.dtype)  # recurrent product, reused every step
        hin = X.empty_like(h0)  # masked h fed to W_hh
        w_t = w_hh.T
        h_prev, c_prev = h0, c0
        for t in range(T):
            if hmask is not None:
                X.multiply(h_prev, hmask, out=hin)
                X.matmul(hin, w_t, out=hp)
            else:
                X.matmul(h_prev, w_t, out=hp)
            if cell == "lstm":
                k.lstm_forward_step(xp[t], hp, b_hh, c_prev, act[t], cs[t], hs[t])
                c_prev = cs[t]
            elif cell == "gru":
                k.gru_forward_step(xp[t], hp, b_hh, h_prev, act[t], hn[t], hs[t])
            else:
                k.rnn_forward_step(xp[t], hp, b_hh, hs[t])
            h_prev = hs[t]

    def layer_backward(self, cache: LayerCache, dhs, w_hh):
        """dhs (T,B,H) = dL/dh_t from above (final state detached) ->
        dxp (T,B,G*H), dw_hh (G*H,H), db_hh (G*H,), dh0 (B,H), dc0 (B,H) or None."""
        X = self.xp
        cell, hs = cache.cell, cache.hs
        T, B, H = hs.shape
        GH = GATES[cell] * H
        dt = hs.dtype
        dhs = X.ascontiguousarray(dhs)
        dxp = X.empty((T, B, GH), dt)
        # LSTM and RNN: dL/dhp equals dL/dxp; GRU differs in the n block (r * .).
        dhp = X.empty((T, B, GH), dt) if cell == "gru" else None
        dh0 = X.empty((B, H), dt)
        dc = X.zeros((B, H), dt) if cell == "lstm" else None
        done = False
        if self._use_persistent(cell, B, H, dt):
            direct = X.empty((B, H), dt) if cell == "gru" else None
            try:
                self.k.persistent_layer_backward(cell, w_hh, cache.hmask, cache.h0, cache.c0, hs,
                                                 cache.act, cache.cs, cache.hn, dhs, dxp, dhp, dc,
                                                 direct, dh0)
                done = True
            except self.k.PersistentUnavailable as e:
                self.fallbacks[(cell, B, H, np.dtype(dt).str)] = str(e)
        if not done:
            self._backward_steps(cache, dhs, w_hh, dxp, dhp, dh0, dc)
        # Weight gradients: one GEMM over the whole window.
        dhp = dxp if dhp is None else dhp
        hin = X.concatenate([cache.h0[None], hs[:-1]])  # (T,B,H) inputs of W_hh
        if cache.hmask is not None:
            hin *= cache.hmask
        dhp2 = dhp.reshape(T * B, GH)
        dw_hh = dhp2.T @ hin.reshape(T * B, H)
        db_hh = dhp2.sum(axis=0)
        return dxp, dw_hh, db_hh, dh0, dc

    def _backward_steps(self, cache: LayerCache, dhs, w_hh, dxp, dhp, dh_rec, dc):
        """The per-step design backward: fused kernel, then one GEMM, per step."""
        X, k = self.xp, self.k
        cell, hs = cache.cell, cache.hs
        T, B, H = hs.shape
        dhp = dxp if dhp is None else dhp
        dh = X.empty((B, H), hs.dtype)
        dh_rec[...] = 0  # dL/dh_t arriving from step t+1
        direct = X.empty((B, H), hs.dtype) if cell == "gru" else None
        for t in range(T - 1, -1, -1):
            X.add(dhs[t], dh_rec, out=dh)
            h_prev = hs[t - 1] if t > 0 else cache.h0
            if cell == "lstm":
                c_prev = cache.cs[t - 1] if t > 0 else cache.c0
                k.lstm_backward_step(cache.act[t], c_prev, cache.cs[t], dh, dc, dxp[t])
            elif cell == "gru":
                k.gru_backward_step(cache.act[t], cache.hn[t], h_prev, dh, dxp[t], dhp[t], direct)
            else:
                k.rnn_backward_step(hs[t], dh, dxp[t])
            X.matmul(dhp[t], w_hh, out=dh_rec)
            if cache.hmask is not None:
                dh_rec *= cache.hmask
            if direct is not None:
                dh_rec += direct
