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

from charrnn.backend import HostBackend, LayerCache
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


class CudaBackend(HostBackend):
    """Runs on the GPU (or numba's CUDA simulator); `k` is charrnn.kernels.cuda. Everything
    but the recurrence is HostBackend's code on CuPy arrays; the recurrence tries the
    persistent kernels first and falls back to HostBackend's per-step loop."""

    reuse_gate_buffers = False  # the CUDA kernels are not checked for act = xp, dxp = act

    def __init__(self, persistent: bool = True):
        super().__init__("cuda", cuda_kernels)
        self.xp = _array_module()
        self.persistent = bool(persistent)
        # (cell, B, H, dtype) -> why the persistent kernels could not take that layer shape
        self.fallbacks: dict[tuple, str] = {}

    def to_numpy(self, a) -> np.ndarray:
        if isinstance(a, np.ndarray) or self.xp is np:
            return np.asarray(a)
        return self.xp.asnumpy(a)

    def _persistent_ran(self, launch, cell, T, B, H, dtype) -> bool:
        """Whether the persistent kernel took this layer window. Windows of one step take the
        per-step design: keeping W_hh on chip gains nothing over one step, and the persistent
        kernels compile per batch size (kernels/cuda.py compiles BR = ceil(B/ROWS) in: a new
        BR costs a forward compile and up to three backward ones), which a names round, its
        batch shrinking every step, would pay at every step."""
        key = (cell, B, H, np.dtype(dtype).str)
        if not self.persistent or T < 2 or key in self.fallbacks:
            return False
        try:
            launch()
            return True
        except self.k.PersistentUnavailable as e:
            self.fallbacks[key] = str(e)
            return False

    def _forward_steps(self, cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn):
        T, B, H = hs.shape

        def launch():
            self.k.persistent_layer_forward(cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn)

        if not self._persistent_ran(launch, cell, T, B, H, hs.dtype):
            super()._forward_steps(cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn)

    def _backward_steps(self, cache: LayerCache, dhs, w_hh, dxp, dhp, dh_rec, dc):
        cell, hs = cache.cell, cache.hs
        T, B, H = hs.shape
        direct = self.xp.empty((B, H), hs.dtype) if cell == "gru" else None

        def launch():
            self.k.persistent_layer_backward(cell, w_hh, cache.hmask, cache.h0, cache.c0, hs,
                                             cache.act, cache.cs, cache.hn, dhs, dxp, dhp, dc,
                                             direct, dh_rec)

        if not self._persistent_ran(launch, cell, T, B, H, hs.dtype):
            super()._backward_steps(cache, dhs, w_hh, dxp, dhp, dh_rec, dc)
