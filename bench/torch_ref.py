"""The identical model in PyTorch: nn.Embedding(V,E) + nn.LSTM(E,H,L) + nn.Linear(H,V).

Training: cross-entropy, torch.optim.Adam, clip_grad_norm_(5.0), hidden state detached and
carried between windows (truncated BPTT, as charrnn's trainer). Sampling: batch 1, one token
per call, softmax at temperature 0.8 and torch.multinomial, as a generation loop would.
Names: rounds of 1000 sequences stepped together up to 16 steps with multinomial sampling,
filtered exactly like `generate_names` (length, duplicates) until 1000 names pass, so both
sides count accepted names. Module names match charrnn's parameter names, so sampling and
names rows load the very weights charrnn uses. CPU runs use 2 threads.

Dimension letters: L=layers, H=hidden, E=embed, B=batch, T=time, V=vocab.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.workloads import GRAD_CLIP, LR, NAMES_MAX_LEN, NAMES_N, SAMPLE_TEMPERATURE, Workload

THREADS = 2  # the reference setting (the machine's core count)
SAMPLE_CHUNK = 50  # characters per sampling unit (as ours.py)
BATCH_POOL = 4
NAMES_ROUND = 1000  # sequences per round


class CharLSTM(nn.Module):
    def __init__(self, V: int, E: int, H: int, L: int):
        super().__init__()
        self.encoder = nn.Embedding(V, E)
        self.rnn = nn.LSTM(E, H, L)
        self.decoder = nn.Linear(H, V)

    def forward(self, x, state=None):
        """x (T,B) long -> logits (T,B,V), (h, c) each (L,B,H)."""
        y, state = self.rnn(self.encoder(x), state)
        return self.decoder(y), state


def setup(device: str) -> torch.device:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA here (a CPU-only build, or no driver)")
    # float32 against float32: cuDNN may otherwise round GEMM inputs to TF32, which our
    # cuBLAS products (CuPy leaves TF32 off) do not.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(device)


def build_model(w: Workload, dev: torch.device, params: dict | None = None) -> CharLSTM:
    model = CharLSTM(w.vocab, w.hidden, w.hidden, w.layers)
    if params is not None:
        model.load_state_dict({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in params.items()})
    return model.to(dev)


def sync_for(dev: torch.device):
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


# -- rows -------------------------------------------------------------------------------
def train_step_fn(w: Workload, dev: torch.device, params=None):
    model = build_model(w, dev)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    T, B, V = w.seq_len, w.batch, w.vocab
    gen = torch.Generator().manual_seed(1)
    pool = [torch.randint(0, V, (T + 1, B), generator=gen).to(dev) for _ in range(BATCH_POOL)]
    carry = {"state": None, "i": 0}

    def one_step():  # a function of its own, as on charrnn's side (ours.py)
        ids = pool[carry["i"] % BATCH_POOL]
        carry["i"] += 1
        opt.zero_grad(set_to_none=True)
        logits, (h, c) = model(ids[:-1], carry["state"])
        loss = loss_fn(logits.reshape(T * B, V), ids[1:].reshape(T * B))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        carry["state"] = (h.detach(), c.detach())

    def step(k: int) -> int:
        for _ in range(k):
            one_step()
        return k * T * B

    return step


def sample_fn(w: Workload, dev: torch.device, params=None, vocab=None):
    """step(k): k*SAMPLE_CHUNK characters at batch 1, from a fresh state after "\\n"."""
    model = build_model(w, dev, params).eval()
    tokens = vocab.tokens
    start = int(vocab.encode("\n")[0])
    gen = torch.Generator(device=dev).manual_seed(1)

    def step(k: int) -> int:
        pieces = []
        with torch.inference_mode():
            x = torch.full((1, 1), start, dtype=torch.long, device=dev)
            state = None
            for _ in range(k * SAMPLE_CHUNK):
                logits, state = model(x, state)
                probs = torch.softmax(logits[0, 0] / SAMPLE_TEMPERATURE, dim=-1)
                cur = int(torch.multinomial(probs, 1, generator=gen))
                pieces.append(tokens[cur])
                x[0, 0] = cur
        return len("".join(pieces))

    return step


def _names_round(model, eos: int, B: int, steps: int, gen, dev):
    """B candidates of at most `steps` characters -> (B, steps+1) ids, lengths (-1: no end)."""
    x = torch.full((1, B), eos, dtype=torch.long, device=dev)
    logits, state = model(x)
    out = torch.zeros((B, steps + 1), dtype=torch.long, device=dev)
    length = torch.full((B,), -1, dtype=torch.long, device=dev)
    for t in range(steps + 1):
        probs = torch.softmax(logits[0] / SAMPLE_TEMPERATURE, dim=-1)
        ids = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        out[:, t] = ids
        length[(ids == eos) & (length < 0)] = t
        if t == steps or bool((length >= 0).all()):
            break
        logits, state = model(ids[None, :], state)
    return out.cpu().numpy(), length.cpu().numpy()


def names_fn(w: Workload, dev: torch.device, params=None, vocab=None):
    """step(k): k runs of 1000 accepted names, filtered like charrnn's generate_names."""
    from charrnn.names import NameFilter

    model = build_model(w, dev, params).eval()
    flt = NameFilter(max_len=NAMES_MAX_LEN, allow_seen=True)
    gen = torch.Generator(device=dev).manual_seed(1)
    budget = max(2000, 200 * NAMES_N)

    def one() -> int:
        found, taken, tried = [], set(), 0
        while len(found) < NAMES_N and tried < budget:
            with torch.inference_mode():
                out, length = _names_round(model, vocab.eos_id, NAMES_ROUND, flt.max_len, gen, dev)
            tried += NAMES_ROUND
            for b in range(NAMES_ROUND):
                if length[b] < 0:
                    continue
                name = vocab.decode(out[b, : length[b]])
                if name not in taken and flt.accepts(name, set()):
                    taken.add(name)
                    found.append(name)
                    if len(found) == NAMES_N:
                        break
        return len(found)

    return lambda k: sum(one() for _ in range(k))


STEP_FNS = {"train": train_step_fn, "sample": sample_fn, "names": names_fn}


def info(dev: torch.device) -> dict:
    out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "onednn_available": torch.backends.mkldnn.is_available(),
           "onednn_enabled": torch.backends.mkldnn.enabled}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["cudnn"] = torch.backends.cudnn.version()
    return out
