"""Text generation: temperature / top-k / top-p sampling, prime text, seeds, streaming.

`generate` yields text as it is produced so the CLI can stream it. The same seed gives the
same text. Lines models (names) restart from a fresh state after every end token, so their
samples are a stream of new lines.

On a host backend the whole loop (cells, decoder, sampling) runs inside the kernel module's
`generate_ids`, CHUNK characters per call with the state carried between calls; on the CUDA
backend inside kernels/cuda_generate.py's `generate_ids`, one persistent kernel per chunk
with the weights, state and uniforms on the device. Models too large for that (and other
backends) take one `model.forward` and one `sample_rows` per character. Every way the
uniforms come from one numpy Generator in the same order, so a seed names one text.
`cfg.half` hands generate_ids its weight matrices as float16 (half the bytes to stream per
character, so faster where they outgrow the caches); the text then differs from float32's.

Dimension letters: T=time, B=batch, V=vocab, L=layers, H=hidden, G=gate blocks.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import numpy as np

from charrnn.backend import HostBackend
from charrnn.config import SampleConfig

# Characters per generate_ids call: large enough that Python's share is noise (2x128 LSTM:
# 256 characters take ~5 ms), small enough that output streams and `| head` ends at once.
CHUNK = 256


def _start_context(vocab, prime: str, lines: bool) -> np.ndarray:
    ids = np.asarray(vocab.encode(prime), np.int64) if prime else np.zeros(0, np.int64)
    if lines:
        return np.concatenate([[vocab.eos_id], ids])
    if len(ids):
        return ids
    # No prime: condition on a newline, as if starting a fresh paragraph.
    nl = vocab.encode("\n") if "\n" in vocab.tokens else np.zeros(1, np.int64)
    return np.asarray(nl, np.int64)


HALF_MAX = float(np.finfo(np.float16).max)


def _stacked_weights(model, xp):
    """generate_ids' weights as arrays of xp: w_ih (L-1,G*H,H), b_ih (L-1,G*H),
    w_hh (L,G*H,H), b_hh (L,G*H), dec_w (V,H). Layers >= 1 all have width H."""
    p, mc = model.params, model.cfg
    L, H, GH = mc.layers, mc.hidden, mc.gates * mc.hidden
    w_ih = xp.zeros((L - 1, GH, H), model.dtype)
    b_ih = xp.zeros((L - 1, GH), model.dtype)
    for k in range(1, L):
        w_ih[k - 1], b_ih[k - 1] = p[f"rnn.weight_ih_l{k}"], p[f"rnn.bias_ih_l{k}"]
    w_hh = xp.stack([p[f"rnn.weight_hh_l{k}"] for k in range(L)])
    b_hh = xp.stack([p[f"rnn.bias_hh_l{k}"] for k in range(L)])
    return w_ih, b_ih, w_hh, b_hh, p["decoder.weight"]


@dataclass
class Prepared:
    """What generate reads from a model besides its state, made once (`prepare`) for any
    number of generate calls: at 3x512 that is ~31 ms with float16 weights (numpy converts
    25 MB), as long as 170 characters take."""

    half: bool  # the stacked matrices hold float16 bits
    table: object  # (V,G*H) layer-0 input projections, on the backend
    weights: tuple | None  # _stacked_weights (halved if half), or None: stepwise generation


def prepare(model, half: bool | None = False) -> Prepared:
    """The model's table and stacked weights for generate. half: float16 matrices (host
    backends only; a weight beyond float16's range is an error); None: float16 where it can
    be (a host backend, every streamed matrix within range), else float32 (`charrnn sample`'s
    default). The model's parameters must not change while it is in use."""
    on_cuda = model.backend.name == "cuda"  # a HostBackend subclass, with its own generator
    host = isinstance(model.backend, HostBackend) and not on_cuda
    if half and not host:
        raise ValueError(f"half-precision sampling runs on the CPU, not on {model.backend.name!r}; "
                         "use --device cpu")
    weights = None
    if host:
        w_ih, b_ih, w_hh, b_hh, dec_w = weights = _stacked_weights(model, np)
        if half is not False:
            # the matrices generate_ids streams (layer 0 reads its float32 input table)
            streamed = {"rnn.weight_ih": w_ih, "rnn.weight_hh": w_hh, "decoder.weight": dec_w}
            big = {n: float(np.abs(w).max(initial=0.0)) for n, w in streamed.items()}
            over = next((n for n, b in big.items() if b > HALF_MAX), None)
            if half and over is not None:
                raise ValueError(f"{over}: a weight of magnitude {big[over]:g} overflows float16; "
                                 "sample without half precision")
            half = over is None
        if half:  # float16, stored as uint16 bits (what generate_ids takes)
            w_ih, w_hh, dec_w = (w.astype(np.float16).view(np.uint16) for w in (w_ih, w_hh, dec_w))
            weights = (w_ih, b_ih, w_hh, b_hh, dec_w)
    elif on_cuda and _fits_device(model):
        weights = _stacked_weights(model, model.backend.xp)
    return Prepared(bool(half), model.input_table(), weights)


def _generated(model, gen, table, weights, h, c, cur: int, rng, cfg: SampleConfig, top_k: int,
               eos: int):
    """Yield ids (n,) CHUNK at a time from `gen` (a kernel module's generate_ids), its
    weights, h and c (updated in place between calls) on the backend's array module; the
    uniforms go in and the ids come out per chunk."""
    be, mc = model.backend, model.cfg
    left = cfg.length
    while left > 0:
        n = min(CHUNK, left)
        u = be.xp.asarray(rng.random(n))  # (n,)
        out = be.xp.empty(n, np.int64)  # (n,)
        gen(mc.cell, mc.residual, table, *weights, model.params["decoder.bias"], h, c, cur,
            float(cfg.temperature), top_k, float(cfg.top_p), u, eos, out)
        ids = be.to_numpy(out)
        cur = int(ids[-1])
        left -= n
        yield ids


def _fused_chunks(model, prep: Prepared, state, cur: int, rng, cfg: SampleConfig, top_k: int,
                  eos: int):
    """Host backends: the kernel module's generate_ids over prep's weights."""
    h = np.ascontiguousarray(state.h[:, 0])  # (L,H)
    # GRU and RNN have no cell state; the kernel leaves this placeholder alone.
    c = (np.ascontiguousarray(state.c[:, 0]) if state.c is not None
         else np.zeros((0, 0), model.dtype))
    yield from _generated(model, model.backend.k.generate_ids, prep.table, prep.weights, h, c,
                          cur, rng, cfg, top_k, eos)


def _device_chunks(model, prep: Prepared, state, cur: int, rng, cfg: SampleConfig, top_k: int,
                   eos: int):
    """The CUDA backend: cuda_generate.generate_ids, weights and state kept on the device."""
    from charrnn.kernels import cuda_generate

    X = model.backend.xp
    h = X.ascontiguousarray(state.h[:, 0])  # (L,H)
    c = X.ascontiguousarray(state.c[:, 0]) if state.c is not None else None  # (L,H) LSTM
    yield from _generated(model, cuda_generate.generate_ids, prep.table, prep.weights, h, c, cur,
                          rng, cfg, top_k, eos)


def _fits_device(model) -> bool:
    """cuda_generate can sample this model (its vectors fit the GPU's shared memory)."""
    from charrnn.kernels import cuda_generate

    return not cuda_generate.unavailable(model.cfg.hidden, model.cfg.gates, model.dtype)


def _stepwise_chunks(model, prep: Prepared, state, cur: int, rng, cfg: SampleConfig, top_k: int,
                     eos: int):
    """Yield ids (n,) CHUNK at a time, one model.forward per character (the fallback of
    device backends)."""
    be, table = model.backend, prep.table
    x = np.zeros((1, 1), np.int64)  # (T=1, B=1)
    pick = np.zeros(1, np.int64)  # (B=1,)
    left = cfg.length
    while left > 0:
        n = min(CHUNK, left)
        u = rng.random(n)  # (n,)
        out = np.empty(n, np.int64)  # (n,)
        for t in range(n):
            x[0, 0] = cur
            logits, state, _ = model.forward(x, state, table=table)
            row = be.to_numpy(logits[0])  # (1,V)
            be.k.sample_rows(row, cfg.temperature, top_k, cfg.top_p, u[t : t + 1], pick)
            cur = out[t] = int(pick[0])
            if cur == eos:
                state = model.zero_state(1)
        left -= n
        yield out


def generate(model, vocab, cfg: SampleConfig, lines: bool = False, prep: Prepared | None = None):
    """Yield generated text piece by piece (cfg.length tokens; the prime is not included).
    cfg.half samples with float16 weight matrices (host backends). prep: `prepare(model,
    cfg.half)` made once for several calls (default: made here)."""
    cfg.validate()
    if prep is None:
        prep = prepare(model, cfg.half)
    elif prep.half != cfg.half:
        raise ValueError(f"prep holds {'float16' if prep.half else 'float32'} weights, "
                         f"cfg.half is {cfg.half}")
    rng = np.random.default_rng(cfg.seed)
    top_k = 1 if cfg.argmax else cfg.top_k
    context = _start_context(vocab, cfg.prime, lines)
    state = model.zero_state(1)
    if len(context) > 1:
        _, state, _ = model.forward(context[:-1, None], state, table=prep.table)
    eos = vocab.eos_id if lines else -1
    args = (model, prep, state, int(context[-1]), rng, cfg, top_k, eos)
    if prep.weights is None:
        chunks = _stepwise_chunks(*args)
    elif model.backend.name == "cuda":
        chunks = _device_chunks(*args)
    else:
        chunks = _fused_chunks(*args)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if vocab.kind == "bytes" else None
    for ids in chunks:
        # <eos> decodes to a newline: a lines model's samples come out one per line.
        piece = utf8.decode(vocab.decode_bytes(ids)) if utf8 is not None else vocab.decode(ids)
        if piece:
            yield piece
    if utf8 is not None:
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail
