"""CharRNN: embedding -> L stacked recurrent layers -> linear decoder, forward and backward.

Parameters are named as in PyTorch's word-language-model example, so a checkpoint's
tensors load into `nn.Embedding` + `nn.LSTM`/`nn.GRU`/`nn.RNN` + `nn.Linear` unrenamed:

  encoder.weight        (V,E)
  rnn.weight_ih_l{k}    (G*H, E if k == 0 else H)
  rnn.weight_hh_l{k}    (G*H, H)
  rnn.bias_ih_l{k}      (G*H,)
  rnn.bias_hh_l{k}      (G*H,)
  decoder.weight        (V,H)
  decoder.bias          (V,)

Layer 0 never multiplies embeddings: its input projection is a row lookup into the table
encoder.weight @ weight_ih_l0.T + bias_ih_l0 (V, G*H), and the table's gradient flows back to
both factors. Layers >= 1 project their whole window with one GEMM.

Dimension letters: T=time, B=batch, V=vocab, E=embed, H=hidden, G=gate blocks, L=layers,
N=T*B rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charrnn.backend import get_backend
from charrnn.config import ModelConfig


@dataclass
class State:
    """Hidden state carried between windows: h (L,B,H); c (L,B,H) for LSTM, else None."""

    h: np.ndarray
    c: np.ndarray | None


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order."""
    V, E, H, GH = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.gates * cfg.hidden
    shapes = {"encoder.weight": (V, E)}
    for k in range(cfg.layers):
        shapes[f"rnn.weight_ih_l{k}"] = (GH, E if k == 0 else H)
        shapes[f"rnn.weight_hh_l{k}"] = (GH, H)
        shapes[f"rnn.bias_ih_l{k}"] = (GH,)
        shapes[f"rnn.bias_hh_l{k}"] = (GH,)
    shapes["decoder.weight"] = (V, H)
    shapes["decoder.bias"] = (V,)
    return shapes


def init_params(cfg: ModelConfig, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """PyTorch's defaults (uniform +-1/sqrt(H) for the recurrence and decoder, N(0,1) for
    the embedding), except the LSTM forget-gate bias starts at 1 so early gradients flow."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(cfg.hidden)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name == "encoder.weight":
            p = rng.standard_normal(shape)
        elif name == "decoder.bias":
            p = np.zeros(shape)
        else:
            p = rng.uniform(-bound, bound, shape)
        params[name] = p.astype(dtype)
    if cfg.cell == "lstm":
        H = cfg.hidden
        for k in range(cfg.layers):
            params[f"rnn.bias_ih_l{k}"][H : 2 * H] = 1.0
            params[f"rnn.bias_hh_l{k}"][H : 2 * H] = 0.0
    return params


def _dropout_mask(rng, shape, p, dtype):
    """Inverted dropout: keep with probability 1-p, scale kept units by 1/(1-p).
    Drawn in the model's dtype and scaled in place: at 3x512 (T,B,H) a float64 draw and
    its float64 quotient took ~30 ms a layer and 52 MiB of temporaries, this ~15 ms."""
    m = rng.random(shape, dtype=dtype)
    return np.multiply(m >= p, dtype.type(1.0 / (1.0 - p)), out=m)


class CharRNN:
    def __init__(self, cfg: ModelConfig, params: dict | None = None, backend=None,
                 dtype=np.float32, seed: int = 0):
        self.cfg = cfg.validate()
        self.backend = backend if backend is not None else get_backend("cpu")
        self.dtype = np.dtype(dtype)
        shapes = param_shapes(cfg)
        if params is None:
            params = init_params(cfg, seed, self.dtype)
        missing = sorted(set(shapes) - set(params))
        if missing:
            raise ValueError(f"parameters missing: {', '.join(missing)}")
        for name, shape in shapes.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(f"parameter {name}: expected shape {shape}, got {tuple(params[name].shape)}")
        self.params = {n: self.backend.asarray(params[n], self.dtype) for n in shapes}

    # -- state ----------------------------------------------------------------------
    def zero_state(self, batch: int) -> State:
        xp, L, H = self.backend.xp, self.cfg.layers, self.cfg.hidden
        c = xp.zeros((L, batch, H), self.dtype) if self.cfg.cell == "lstm" else None
        return State(xp.zeros((L, batch, H), self.dtype), c)

    def _check_inputs(self, ids, state: State):
        if not (hasattr(ids, "ndim") and ids.ndim == 2 and ids.dtype.kind in "iu"):
            got = f"{getattr(ids, 'ndim', '?')}-D {getattr(ids, 'dtype', type(ids).__name__)}"
            raise ValueError(f"ids: expected a 2-D integer array (T, B), got {got}")
        T, B = ids.shape
        if T == 0 or B == 0:
            raise ValueError(f"ids: expected T >= 1 and B >= 1, got shape {ids.shape}")
        V = self.cfg.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"ids: values must be in [0, {V}), got range [{lo}, {hi}]")
        want = (self.cfg.layers, B, self.cfg.hidden)
        if tuple(state.h.shape) != want:
            raise ValueError(f"state.h: expected shape {want}, got {tuple(state.h.shape)}")
        if (state.c is None) != (self.cfg.cell != "lstm") or (
            state.c is not None and tuple(state.c.shape) != want
        ):
            got = None if state.c is None else tuple(state.c.shape)
            raise ValueError(f"state.c: expected {want if self.cfg.cell == 'lstm' else None}, got {got}")

    # -- forward --------------------------------------------------------------------
    def input_table(self):
        """(V, G*H) layer-0 input projection of every token: encoder @ W_ih0.T + b_ih0."""
        p = self.params
        return p["encoder.weight"] @ p["rnn.weight_ih_l0"].T + p["rnn.bias_ih_l0"]

    def _input_projection(self, k: int, x, flat_ids, table, T: int, B: int):
        """Layer k's input projections for the window, b_ih included: (T,B,G*H)."""
        p, be = self.params, self.backend
        GH = self.cfg.gates * self.cfg.hidden
        if k == 0:
            return be.gather_rows(table, flat_ids).reshape(T, B, GH)
        xp = (x.reshape(T * B, -1) @ p[f"rnn.weight_ih_l{k}"].T).reshape(T, B, GH)
        xp += p[f"rnn.bias_ih_l{k}"]  # in place: no second (T,B,G*H) array
        return xp

    def forward(self, ids, state: State, train: bool = False, rng=None, table=None, recompute: int = 0):
        """ids (T,B) int; state -> logits (T,B,V), final State, cache for backward.
        train=True applies dropout (drawn from `rng`, a numpy Generator). recompute=N keeps
        only the hidden states of the N lowest layers; backward reruns their steps, which
        gives the same gradients, bit for bit, from about a third of those layers' memory."""
        self._check_inputs(ids, state)
        cfg, p, be = self.cfg, self.params, self.backend
        T, B = ids.shape
        H, L = cfg.hidden, cfg.layers
        drop = train and cfg.dropout > 0
        rec_drop = train and cfg.rec_dropout > 0
        if (drop or rec_drop) and rng is None:
            raise ValueError("rng: a numpy Generator is required when training with dropout")
        flat_ids = be.asarray(ids.reshape(-1), np.int64)
        if table is None:
            table = self.input_table()
        x = None  # (T,B,H) input of the current layer (layers >= 1)
        layers, h_out, c_out = [], [], []
        for k in range(L):
            xp = self._input_projection(k, x, flat_ids, table, T, B)
            if k > 0:
                x = self._drop_states_below(k, x, layers, h_out, c_out)
            hmask = be.asarray(_dropout_mask(rng, (B, H), cfg.rec_dropout, self.dtype)) if rec_drop else None
            c0 = state.c[k] if state.c is not None else None
            hs, hT, cT, lc = be.layer_forward(cfg.cell, xp, p[f"rnn.weight_hh_l{k}"], p[f"rnn.bias_hh_l{k}"],
                                              state.h[k], c0, hmask)
            del xp  # the cache owns it now (as the activations, when the backend reuses buffers)
            h_out.append(hT)
            c_out.append(cT)
            if k < recompute:
                if cT is not None:
                    c_out[-1] = cT.copy()  # the view would keep all of cs alive to the end
                lc.drop_gates()
            y = hs + x if (cfg.residual and k > 0) else hs  # (T,B,H)
            dmask = be.asarray(_dropout_mask(rng, (T, B, H), cfg.dropout, self.dtype)) if drop else None
            layers.append((x, lc, dmask))
            x = y * dmask if dmask is not None else y
            # x alone carries this layer's output on: a name left on hs (or on the final
            # c, a view of the window's cs) would keep the states that _drop_states_below
            # forgets alive through the next layer's window (25 MiB at 3x512, at the peak)
            del hs, hT, cT, lc, y
        logits = x.reshape(T * B, H) @ p["decoder.weight"].T + p["decoder.bias"]  # (N,V)
        xpm = be.xp
        new_state = State(xpm.stack(h_out), xpm.stack(c_out) if cfg.cell == "lstm" else None)
        cache = {"ids": flat_ids, "T": T, "B": B, "top": x, "layers": layers, "table": table}
        return logits.reshape(T, B, cfg.vocab_size), new_state, cache

    def _drop_states_below(self, k: int, x, layers: list, h_out: list, c_out: list):
        """Once layer k has its input projections, the layer below forgets its states (see
        HostBackend.drop_states) until its backward, which comes after layer k's. Returns
        what to keep as layer k's input for its weight gradient: None when that input is the
        forgotten h itself (no residual, no dropout); the backward then rebuilds it."""
        below = layers[k - 1][1]
        hs = below.hs
        # with a residual, x (that h) is read again after this layer's window: it stays
        keep_h = x is hs and self.cfg.residual
        if not self.backend.drop_states(below, keep_h):  # no scan here, or recomputed gates
            return x
        # the final state's rows are views: alone they would keep the whole window alive
        h_out[k - 1] = h_out[k - 1].copy()
        if c_out[k - 1] is not None:
            c_out[k - 1] = c_out[k - 1].copy()
        return None if (x is hs and not self.cfg.residual) else x

    # -- loss -----------------------------------------------------------------------
    def loss(self, logits, targets, mask=None):
        """logits (T,B,V); targets (T,B) int; mask (T,B) float or None ->
        (mean loss over valid positions in nats, dlogits (T,B,V), number of valid positions)."""
        T, B, V = logits.shape
        if tuple(targets.shape) != (T, B):
            raise ValueError(f"targets: expected shape {(T, B)}, got {tuple(targets.shape)}")
        be = self.backend
        if mask is None:
            m = be.xp.ones(T * B, self.dtype)
        else:
            if tuple(mask.shape) != (T, B):
                raise ValueError(f"mask: expected shape {(T, B)}, got {tuple(mask.shape)}")
            m = be.asarray(mask.reshape(-1), self.dtype)
        n = float(m.sum())
        if n <= 0:
            raise ValueError("mask: no valid positions")
        total, dl = be.softmax_xent(logits.reshape(T * B, V), be.asarray(targets.reshape(-1), np.int64), m, 1.0 / n)
        return total / n, dl.reshape(T, B, V), n

    # -- backward -------------------------------------------------------------------
    def backward(self, cache, dlogits) -> dict:
        """dlogits (T,B,V) -> gradient of every parameter (same names and shapes).
        Consumes the cache: each layer's activations are dropped once its gradients are
        done, so the peak holds one layer's backward temporaries, not all of them."""
        cfg, p, be = self.cfg, self.params, self.backend
        T, B = cache["T"], cache["B"]
        H, V = cfg.hidden, cfg.vocab_size
        dl = dlogits.reshape(T * B, V)
        top = cache.pop("top").reshape(T * B, H)
        g = {"decoder.weight": dl.T @ top, "decoder.bias": dl.sum(axis=0)}
        del top  # (with dropout, an array of its own)
        dy = (dl @ p["decoder.weight"]).reshape(T, B, H)  # dL/d(output of the top layer)
        for k in range(cfg.layers - 1, -1, -1):
            x, lc, dmask = cache["layers"][k]
            cache["layers"][k] = None
            if dmask is not None:
                dy *= dmask  # in place: dy is this pass's own array
            del dmask  # (T,B,H), spent
            if lc.gates_dropped:
                xp = self._input_projection(k, x, cache["ids"], cache["table"], T, B)
                be.recompute_gates(lc, xp, p[f"rnn.weight_hh_l{k}"], p[f"rnn.bias_hh_l{k}"])
                del xp  # lc holds it now (as the activations, when the backend reuses buffers)
            be.rebuild_states(lc)
            dxp, dw_hh, db_hh, _, _ = be.layer_backward(lc, dy, p[f"rnn.weight_hh_l{k}"])
            del lc
            g[f"rnn.weight_hh_l{k}"] = dw_hh
            g[f"rnn.bias_hh_l{k}"] = db_hh
            GH = dxp.shape[2]
            dxp2 = dxp.reshape(T * B, GH)
            if k > 0:
                if x is None:  # the layer below's h, forgotten with its states
                    x = self._rebuilt_states(cache["layers"][k - 1][1]).hs
                g[f"rnn.weight_ih_l{k}"] = dxp2.T @ x.reshape(T * B, H)
                # LSTM and RNN: both biases sit in the same sum, so their gradients are equal
                g[f"rnn.bias_ih_l{k}"] = dxp2.sum(axis=0) if cfg.cell == "gru" else db_hh.copy()
                # y = h + x: with a residual the gradient reaches x both ways; without one,
                # dy is spent and goes before dL/dx is made (one (T,B,H) array less then)
                through = dy if cfg.residual else None
                del dy
                dy = (dxp2 @ p[f"rnn.weight_ih_l{k}"]).reshape(T, B, H)
                if through is not None:
                    dy += through
                del through
            else:
                dtable = be.scatter_add_rows(cache["ids"], dxp2, V)  # (V, G*H)
                g["encoder.weight"] = dtable @ p["rnn.weight_ih_l0"]
                g["rnn.weight_ih_l0"] = dtable.T @ p["encoder.weight"]
                g["rnn.bias_ih_l0"] = dtable.sum(axis=0)
            del dxp, dxp2, x  # before the layer below allocates its own
        return {n: g[n] for n in p}

    def _rebuilt_states(self, lc):
        """lc with its states back (HostBackend.rebuild_states). A function of its own so
        that no name in backward's loop keeps the layer's cache, which the next layer down
        would otherwise carry through its own backward (75 MiB at 3x512)."""
        self.backend.rebuild_states(lc)
        return lc

    # -- conveniences -----------------------------------------------------------------
    def num_params(self) -> int:
        return int(sum(int(np.prod(a.shape)) for a in self.params.values()))

    def host_params(self) -> dict[str, np.ndarray]:
        return {n: self.backend.to_numpy(a) for n, a in self.params.items()}


__all__ = ["CharRNN", "State", "init_params", "param_shapes"]
