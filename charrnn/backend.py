"""Backends: where the recurrence runs. The model calls these, never numba directly.

A backend owns an array module (`xp`: numpy on the host) and a kernel module with the
names defined in `kernels/reference.py`. `HostBackend` runs the time loop of one layer in
Python: per step one BLAS GEMM for the recurrent product plus one fused element-wise kernel
for all gates; everything that is not recurrent (input projections, weight gradients) is one
GEMM over the whole window, done by the model.

  reference  plain numpy kernels, any float dtype (the truth; float64 gradient checks)
  cpu        numba kernels, float32 or float64
  cuda       numba.cuda kernels (charrnn.cuda_backend), when a GPU is present

Dimension letters: T=time, B=batch, H=hidden, G=gate blocks, V=vocab, N=T*B rows.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from charrnn.config import GATES

BACKENDS = ("auto", "cpu", "numpy", "cuda", "reference")  # numpy is the reference backend's user-facing name


@dataclass
class LayerCache:
    """What one layer's forward keeps for its backward (all arrays of the backend)."""

    cell: str
    h0: np.ndarray  # (B,H) initial hidden state
    c0: np.ndarray | None  # (B,H) initial cell state (LSTM)
    hmask: np.ndarray | None  # (B,H) recurrent dropout mask on h fed to W_hh
    hs: np.ndarray  # (T,B,H) hidden states
    act: np.ndarray | None  # (T,B,G*H) activated gates (LSTM, GRU)
    cs: np.ndarray | None  # (T,B,H) cell states (LSTM)
    hn: np.ndarray | None  # (T,B,H) W_hn h + b_hn (GRU)

    def drop_gates(self):
        """Forget what recompute_gates can rebuild (activations, cell states, GRU's hn): a
        layer's backward then first reruns its forward steps. hs stays: it is the next
        layer's input and the recurrence's."""
        self.act = self.cs = self.hn = None

    @property
    def gates_dropped(self) -> bool:
        return self.cell != "rnn" and self.act is None

    @property
    def states_dropped(self) -> bool:
        """Whether HostBackend.drop_states forgot states that rebuild_states must refill: h,
        or (an LSTM whose h is kept as the next layer's input) c alone."""
        return self.hs is None or (self.cell == "lstm" and self.cs is None and self.act is not None)


class HostBackend:
    """The per-step design over an array module `xp` (numpy here; CudaBackend subclasses it
    with CuPy) and a kernel module `k` (reference.py, cpu.py or cuda.py)."""

    xp = np
    # One gate-width buffer serves three arrays: a window's input projections are overwritten
    # by the activations, and those by their gradients in the backward (the step kernels allow it),
    # so training holds one (T,B,G*H) array a layer, not three. The CUDA kernels have not
    # been checked for it, so CudaBackend turns it off.
    reuse_gate_buffers = True

    def __init__(self, name: str, kernels: ModuleType, reuse_gate_buffers: bool | None = None):
        self.name = name
        self.k = kernels
        if reuse_gate_buffers is not None:  # tests keep a reference's caches intact
            self.reuse_gate_buffers = reuse_gate_buffers

    # -- memory ---------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

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
    def layer_forward(self, cell, xp, w_hh, b_hh, h0, c0, hmask):
        """xp (T,B,G*H) input projections (b_ih included); w_hh (G*H,H); b_hh (G*H,);
        h0, c0 (B,H); hmask (B,H) or None -> hs (T,B,H), final h (B,H), final c, cache.
        With reuse_gate_buffers, xp is overwritten (by the activations the cache keeps)."""
        T, B, _ = xp.shape
        xp = self.xp.ascontiguousarray(xp)
        hs = self.xp.empty((T, B, h0.shape[1]), xp.dtype)
        act, cs, hn = self._gate_buffers(cell, xp, h0.shape[1])
        self._forward_steps(cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn)
        cache = LayerCache(cell, h0, c0, hmask, hs, act, cs, hn)
        return hs, hs[T - 1], (cs[T - 1] if cs is not None else None), cache

    def recompute_gates(self, cache: LayerCache, xp, w_hh, b_hh):
        """Refill a cache whose gates were dropped (LayerCache.drop_gates) by rerunning the
        window's steps on the same inputs: xp (T,B,G*H) the layer's input projections again.
        The same kernels on the same operands give bit-identical activations (tested); hs is
        rewritten with the values it already holds."""
        xp = self.xp.ascontiguousarray(xp)
        cache.act, cache.cs, cache.hn = self._gate_buffers(cache.cell, xp, cache.hs.shape[2])
        self._forward_steps(cache.cell, xp, w_hh, b_hh, cache.h0, cache.c0, cache.hmask, cache.hs,
                            cache.act, cache.cs, cache.hn)

    def drop_states(self, cache: LayerCache, keep_h: bool = False) -> bool:
        """Forget the states the gates determine: LSTM c and h, GRU h (RNN keeps h: it has
        no gates). rebuild_states recomputes them bit for bit with an element-wise scan
        (measured 7.6 ms of a 1.4 s 3x512 step, 0.21 ms of an 11.5 ms 2x128 one), where a
        layer's recompute (LayerCache.drop_gates) reruns its GEMMs. The model drops them for
        the layers below the top, whose backward comes last: at 3x512 that is two (T,B,H)
        arrays, 25 MiB, a layer (the measured peak fell 494 -> 466 MiB). False where the
        kernel module has no such scan (cuda.py) or the gates are gone. keep_h: h stays (the
        model keeps it anyway, as the next layer's residual input), an LSTM forgets c alone."""
        if cache.act is None or not hasattr(self.k, f"{cache.cell}_states_from_gates"):
            return False
        if keep_h and cache.cs is None:  # GRU: h is all its states
            return False
        cache.cs = None
        if not keep_h:
            cache.hs = None
        return True

    def rebuild_states(self, cache: LayerCache) -> None:
        """Refill what drop_states forgot (nothing if it is there)."""
        if not cache.states_dropped:
            return
        X = self.xp
        T, B, GH = cache.act.shape
        H = GH // GATES[cache.cell]
        if cache.hs is None:  # a kept h is rewritten below with the values it holds
            cache.hs = X.empty((T, B, H), cache.act.dtype)
        if cache.cell == "lstm":
            cache.cs = X.empty((T, B, H), cache.act.dtype)
            self.k.lstm_states_from_gates(cache.act, _c(X, cache.c0), cache.cs, cache.hs)
        else:
            self.k.gru_states_from_gates(cache.act, _c(X, cache.h0), cache.hs)

    def _gate_buffers(self, cell, xp, H):
        """Where a window's forward writes: act (T,B,G*H) (xp itself when reusing), cs and hn (T,B,H)."""
        X = self.xp
        T, B, GH = xp.shape
        act = None
        if cell != "rnn":
            act = xp if self.reuse_gate_buffers else X.empty((T, B, GH), xp.dtype)
        cs = X.empty((T, B, H), xp.dtype) if cell == "lstm" else None
        hn = X.empty((T, B, H), xp.dtype) if cell == "gru" else None
        return act, cs, hn

    def _forward_steps(self, cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn):
        """The kernel module's window kernel when it has one (cpu: all T steps in one call);
        else, and in the reference, per step one GEMM for the recurrent product and one fused
        kernel for all gates. The window kernels are tested against this loop."""
        X, k = self.xp, self.k
        window = getattr(k, f"{cell}_forward_window", None)
        if window is not None:
            window(xp, w_hh, b_hh, _c(X, h0), _c(X, c0), _c(X, hmask), act, cs, hn, hs)
            return
        T, B, GH = xp.shape
        hp = X.empty((B, GH), xp.dtype)  # recurrent product, reused every step
        hin = X.empty_like(h0)  # masked h fed to W_hh
        # A contiguous W_hh.T: OpenBLAS runs (64,128)@(128,512) in 64 us against 78 with the
        # transposed view; the copy costs one pass over W_hh per window.
        w_t = X.ascontiguousarray(w_hh.T)
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
        dxp (T,B,G*H), dw_hh (G*H,H), db_hh (G*H,), dh0 (B,H), dc0 (B,H) or None.
        With reuse_gate_buffers, dxp is the cache's activation array (the cache is spent)."""
        X = self.xp
        cell, hs = cache.cell, cache.hs
        T, B, H = hs.shape
        GH = GATES[cell] * H
        dt = hs.dtype
        dhs = X.ascontiguousarray(dhs)
        reuse = self.reuse_gate_buffers and cache.act is not None
        dxp = cache.act if reuse else X.empty((T, B, GH), dt)
        # LSTM and RNN: dL/dhp equals dL/dxp; GRU differs in the n block (r * .).
        dhp = X.empty((T, B, GH), dt) if cell == "gru" else None
        dh0 = X.empty((B, H), dt)
        dc = X.zeros((B, H), dt) if cell == "lstm" else None
        self._backward_steps(cache, dhs, w_hh, dxp, dhp, dh0, dc)
        # Weight gradients: one GEMM over the window (two without a mask: step 0's input is
        # h0, the others' are hs[:-1], read in place rather than copied into one (T,B,H)).
        dhp = dxp if dhp is None else dhp
        dhp2 = dhp.reshape(T * B, GH)
        if cache.hmask is None:
            dw_hh = dhp[0].T @ cache.h0
            if T > 1:
                dw_hh += dhp2[B:].T @ hs[:-1].reshape((T - 1) * B, H)
        else:
            hin = X.concatenate([cache.h0[None], hs[:-1]])  # (T,B,H) inputs of W_hh
            hin *= cache.hmask
            dw_hh = dhp2.T @ hin.reshape(T * B, H)
        db_hh = dhp2.sum(axis=0)
        return dxp, dw_hh, db_hh, dh0, dc

    def _backward_steps(self, cache: LayerCache, dhs, w_hh, dxp, dhp, dh_rec, dc):
        """The kernel module's backward window kernel when it has one; else per step the
        fused backward kernel, then one GEMM for dL/dh_{t-1}. Leaves dL/dh0 in dh_rec and
        dL/dc0 in dc."""
        X, k = self.xp, self.k
        cell, hs = cache.cell, cache.hs
        T, B, H = hs.shape
        dhp = dxp if dhp is None else dhp
        window = getattr(k, f"{cell}_backward_window", None)
        if window is not None:
            window(cache.act, cache.cs, cache.hn, hs, _c(X, cache.h0), _c(X, cache.c0), _c(X, cache.hmask),
                   dhs, w_hh, dxp, dhp, dh_rec, dc)
            return
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


def _c(X, a):
    """a C-contiguous (the window kernels address rows by shape), or None."""
    return None if a is None else X.ascontiguousarray(a)


def cuda_usable() -> bool:
    """True when numba finds a real GPU and CuPy (whose cuBLAS runs the GEMMs) is installed;
    never under the CUDA simulator."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - no numba-cuda, no driver, a broken install: the CPU it is
        return False


def get_backend(name: str = "auto"):
    """'auto' picks cuda when a GPU is usable, else cpu."""
    if name not in BACKENDS:
        raise ValueError(f"unknown device {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        name = "cuda" if cuda_usable() else "cpu"
    if name in ("reference", "numpy"):
        from charrnn.kernels import reference

        return HostBackend("reference", reference)
    if name == "cpu":
        from charrnn.kernels import cpu

        return HostBackend("cpu", cpu)
    if not cuda_usable():
        raise ValueError("device 'cuda' requested but no CUDA GPU (or no CuPy: pip install "
                         "'charrnn[cuda]') was found; use --device cpu")
    from charrnn.cuda_backend import CudaBackend

    return CudaBackend()

