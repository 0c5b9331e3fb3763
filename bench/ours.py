"""charrnn's side of every row, through the public API only.

Training mirrors `Trainer._train_step` without a Trainer (no corpus, no run directory):
forward(train=True) -> loss -> backward -> clip_grad_norm -> Adam.step, the hidden state
carried from window to window. Sampling goes through `charrnn.sampler.generate` at batch 1
and names through `charrnn.names.generate_names`, so both pick up whatever faster paths the
library grows.

Dimension letters: L=layers, H=hidden, E=embed, B=batch, T=time, V=vocab.
"""

from __future__ import annotations

# isort: off
import math
from collections import Counter

# charrnn first: its thread settings (OPENBLAS_THREAD_TIMEOUT, OMP_WAIT_POLICY) only take
# effect if set before numpy loads OpenBLAS, as `charrnn train` does. Imported after numpy,
# OpenBLAS's idle thread kept spinning beside numba's and the rows measured a setup no
# user runs.
import charrnn  # noqa: F401
import numpy as np

# isort: on

from bench.workloads import (
    GRAD_CLIP,
    LR,
    NAMES_EOS_BIAS,
    NAMES_MAX_LEN,
    NAMES_N,
    SAMPLE_TEMPERATURE,
    Workload,
)
from charrnn import spin_for_generation
from charrnn.backend import get_backend
from charrnn.config import ModelConfig, SampleConfig
from charrnn.model import CharRNN, init_params
from charrnn.names import NameFilter, generate_names
from charrnn.optim import Adam, clip_grad_norm
from charrnn.sampler import generate, prepare
from charrnn.vocab import Vocab

# The 65 characters of tiny-shakespeare: the sampling rows' vocabulary.
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SAMPLE_CHUNK = 50  # characters per sampling unit
BATCH_POOL = 4  # distinct random training batches, cycled


def vocab_for(w: Workload) -> Vocab:
    if w.kind == "names":
        return Vocab.build(Counter("abcdefghijklmnopqrstuvwxyz"), lines=True)
    if w.vocab != len(SHAKESPEARE_CHARS):
        raise ValueError(f"no {w.vocab}-character vocabulary defined for {w.name}")
    return Vocab.build(Counter(SHAKESPEARE_CHARS))


def model_config(w: Workload) -> ModelConfig:
    # torch's nn.LSTM: E=H, no residual connections (not charrnn's defaults)
    return ModelConfig(cell="lstm", vocab_size=w.vocab, embed=w.hidden, hidden=w.hidden,
                       layers=w.layers, residual=False)


def random_params(w: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """charrnn's initialisation; names rows get the end-token bias (see workloads.py).
    torch_ref.py loads the same arrays, so both sides sample the same distribution."""
    params = init_params(model_config(w), seed)
    if w.kind == "names":
        params["decoder.bias"][vocab_for(w).eos_id] = NAMES_EOS_BIAS
    return params


_BACKENDS: list = []  # every backend this worker built: info() reports their fallbacks


def build_model(w: Workload, device: str) -> CharRNN:
    backend = get_backend(device)
    _BACKENDS.append(backend)
    return CharRNN(model_config(w), params=random_params(w), backend=backend)


def sync_for(device: str):
    if device != "cuda":
        return lambda: None
    from numba import cuda

    return cuda.synchronize


# -- rows -------------------------------------------------------------------------------
def train_step_fn(w: Workload, device: str):
    """step(k): k optimizer steps on random (T,B) windows -> characters processed."""
    model = build_model(w, device)
    be = model.backend
    opt = Adam(model.params, be.k, lr=LR, xp=be.xp)
    rng = np.random.default_rng(1)  # dropout masks (none at dropout 0) and tokens
    T, B = w.seq_len, w.batch
    # int32 like the batchers' windows: x = ids[:-1], y = ids[1:]
    pool = [rng.integers(0, w.vocab, (T + 1, B)).astype(np.int32) for _ in range(BATCH_POOL)]
    carry = {"state": model.zero_state(B), "i": 0}

    def one_step():
        # A function of its own, as Trainer._train_step: its arrays (activations, gradients)
        # are freed on return, not kept alive into the next step's forward.
        ids = pool[carry["i"] % BATCH_POOL]
        carry["i"] += 1
        logits, new_state, cache = model.forward(ids[:-1], carry["state"], train=True, rng=rng,
                                                 recompute=w.recompute)
        loss, dlogits, _ = model.loss(logits, ids[1:], None)
        grads = model.backward(cache, dlogits)
        norm = clip_grad_norm(grads, GRAD_CLIP, be.k)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise FloatingPointError(f"{w.name}: non-finite loss {loss} or norm {norm}")
        opt.step(grads, LR)
        carry["state"] = new_state

    def step(k: int) -> int:
        for _ in range(k):
            one_step()
        return k * T * B

    return step


def sample_fn(w: Workload, device: str):
    """step(k): one `generate` of k*SAMPLE_CHUNK characters at batch 1 -> characters."""
    spin_for_generation()  # as `charrnn sample` does, before the model starts numba's pool
    model = build_model(w, device)
    vocab = vocab_for(w)
    prep = prepare(model, w.half)  # once, as `charrnn sample` does for all its samples
    seed = [0]

    def step(k: int) -> int:
        seed[0] += 1
        cfg = SampleConfig(length=k * SAMPLE_CHUNK, temperature=SAMPLE_TEMPERATURE, seed=seed[0],
                           half=w.half)
        return sum(len(piece) for piece in generate(model, vocab, cfg, prep=prep))

    return step


def names_fn(w: Workload, device: str):
    """step(k): k calls of generate_names(n=1000, max_len=16, seen names allowed) -> names."""
    model = build_model(w, device)
    vocab = vocab_for(w)
    flt = NameFilter(max_len=NAMES_MAX_LEN, allow_seen=True)
    seed = [0]

    def step(k: int) -> int:
        found = 0
        for _ in range(k):
            seed[0] += 1
            found += len(generate_names(model, vocab, NAMES_N, flt, set(), SAMPLE_TEMPERATURE,
                                        seed=seed[0]))
        return found

    return step


STEP_FNS = {"train": train_step_fn, "sample": sample_fn, "names": names_fn}


def info(device: str) -> dict:
    """What the worker reports about charrnn's runtime (after the work: numba's threading
    layer is only chosen at the first parallel call)."""
    import numba

    out = {"numba_threads": numba.config.NUMBA_NUM_THREADS}
    try:
        out["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel kernel has run
        pass
    if device == "cuda":
        from numba import cuda

        from charrnn.kernels import cuda_generate

        name = getattr(cuda.get_current_device(), "name", "numba's CUDA simulator")
        out["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        # A slower path taken instead of a persistent kernel must not pass for charrnn's speed.
        why = [f"{key}: {msg}" for be in _BACKENDS for key, msg in be.fallbacks.items()]
        why += [f"sampling {key}: {msg}" for key, msg in cuda_generate.FALLBACKS.items()]
        if why:
            out["fallbacks"] = why
    return out
