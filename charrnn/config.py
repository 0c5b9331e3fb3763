"""Configuration dataclasses: one field per CLI option, one comment per field.

The whole config is stored in every checkpoint (as JSON), so `sample`, `eval` and
`--resume` need nothing but the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

CELLS = ("lstm", "gru", "rnn")
# Gate blocks per cell: LSTM i,f,g,o; GRU r,z,n; vanilla RNN one (PyTorch order).
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("adam", "adamw")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    # `not isfinite`: nan passes every comparison, and inf is no usable rate or count
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{_option(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_fraction(name: str, value: float, hi_open: bool = True) -> None:
    if not (0.0 <= value < 1.0 if hi_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{_option(name)} must be in [0, 1), got {value}")


def _option(field: str) -> str:
    """A field as its command-line option spells it (each option maps to one field)."""
    return field.replace("_", "-")


@dataclass
class ModelConfig:
    cell: str = "lstm"  # recurrent cell: lstm | gru | rnn (tanh)
    vocab_size: int = 0  # V: number of token ids (characters plus special tokens)
    # E: embedding width (folded into a (V, G*H) table for layer 0). 256 and residual
    # connections by default: at the end of a 2,200-step 3x512 Shakespeare run, residual
    # alone gained 0.090 nats/char, embed 256 alone 0.047, both 0.101
    # (docs/ablation-shakespeare.svg); GRU and RNN gain too (docs/levers-cells.md).
    embed: int = 256
    hidden: int = 512  # H: units per recurrent layer
    layers: int = 3  # L: stacked recurrent layers
    dropout: float = 0.0  # inverted dropout on each layer's output (inputs of layers >=1 and the decoder)
    rec_dropout: float = 0.0  # variational dropout on h fed back into the recurrence, one mask per window
    residual: bool = True  # add each layer's input to its output (layers >= 1, equal widths)

    def validate(self) -> ModelConfig:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; valid cells: {', '.join(CELLS)}")
        _check_positive("vocab_size", self.vocab_size)
        _check_positive("embed", self.embed)
        _check_positive("hidden", self.hidden)
        _check_positive("layers", self.layers)
        _check_fraction("dropout", self.dropout)
        _check_fraction("rec_dropout", self.rec_dropout)
        return self

    @property
    def gates(self) -> int:
        return GATES[self.cell]


@dataclass
class TrainConfig:
    batch_size: int = 64  # B: parallel streams (prose) or lines per batch (--lines)
    seq_len: int = 100  # T: truncated-BPTT window in characters (prose mode)
    lr: float = 2e-3  # peak learning rate
    optimizer: str = "adamw"  # adam | adamw (decoupled weight decay)
    weight_decay: float = 0.0  # L2 (adam) or decoupled decay (adamw) on weight matrices
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    grad_clip: float = 5.0  # global-norm clipping threshold (0 disables)
    schedule: str = "cosine"  # constant | step | cosine (with warm-up)
    warmup: int = 100  # linear warm-up steps
    min_lr_frac: float = 0.1  # cosine floor as a fraction of lr
    decay_every: int = 1000  # step schedule: steps between decays
    decay_rate: float = 0.5  # step schedule: multiply lr by this each decay
    steps: int = 2000  # total optimizer steps of the run (resume continues up to this)
    epochs: float = 0.0  # if > 0, overrides steps: passes over the training data
    val_frac: float = 0.1  # validation split: the last fraction (prose) or random lines
    test_frac: float = 0.0  # test split (prose: after val; lines: random)
    test_count: int = 0  # lines mode: exact number of test lines (overrides test_frac)
    split_seed: int = 3407  # lines mode: permutation seed for the val/test split
    eval_every: int = 200  # steps between validation passes and checkpoints
    eval_max_chars: int = 0  # cap on validation characters per pass (0: the whole split)
    patience: int = 0  # early stopping: evals without improvement before stopping (0: off)
    keep_every: int = 0  # also keep the weights every N steps as step-N.safetensors (0: off)
    seed: int = 1337  # seed for initialisation, batch order and dropout
    lines: bool = False  # one example per line, framed by start/end tokens, padded and masked
    encoding: str = "utf-8"  # corpus text encoding, or "bytes" to model raw bytes
    max_vocab: int = 0  # keep the most frequent characters, map the rest to <unk> (0: all)
    device: str = "auto"  # auto | cpu (numba) | numpy | cuda
    recompute: int = 0  # lowest layers whose gates the backward recomputes: less memory, more time, same result

    def validate(self) -> TrainConfig:
        for name in ("batch_size", "seq_len", "steps", "eval_every", "decay_every"):
            _check_positive(name, getattr(self, name))
        for name in ("warmup", "patience", "test_count", "max_vocab", "eval_max_chars", "recompute", "seed",
                     "split_seed", "keep_every"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        _check_positive("lr", self.lr)
        _check_positive("epochs", self.epochs, allow_zero=True)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("grad_clip", self.grad_clip, allow_zero=True)
        _check_fraction("val_frac", self.val_frac)
        _check_fraction("test_frac", self.test_frac)
        if self.val_frac + self.test_frac >= 1.0:
            raise ValueError("val-frac + test-frac must be < 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.device not in ("auto", "cpu", "numpy", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; valid: auto, cpu, numpy, cuda")
        return self


@dataclass
class SampleConfig:
    length: int = 1000  # characters to generate
    temperature: float = 0.8  # divide logits by this (lower: safer, higher: wilder)
    top_k: int = 0  # keep only the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability (1: all)
    prime: str = ""  # text to condition on (echoed first)
    seed: int | None = None  # same seed, same text (None: fresh entropy)
    argmax: bool = False  # always take the most likely token (greedy)
    # stream float16 weight matrices (CPU: ~2x faster at 3x512, loss change ~3e-6 nats/char;
    # the CLI's default wherever the weights fit float16); False: float32, exactly the model
    half: bool = False

    def validate(self) -> SampleConfig:
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        return self


def check_recompute(recompute: int, layers: int) -> None:
    """--recompute against the model's depth (TrainConfig alone does not know it)."""
    if recompute and recompute >= layers:
        raise ValueError(f"--recompute must be below --layers ({layers}): the top layer's backward "
                         "runs first, so recomputing it saves no memory")


def to_dict(cfg) -> dict:
    return asdict(cfg)


# The fields that fix what a model's weights compute. A checkpoint must state each: a
# default filled in for a missing one could silently build another network around them.
ARCHITECTURE = ("cell", "vocab_size", "embed", "hidden", "layers", "residual")


def from_dict(cls, data: dict):
    """Build a config from a checkpoint's JSON, ignoring keys this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})
