"""Corpus files + TrainConfig -> vocabulary and train/val/test splits.

One function builds the data the same way for a new run, a resumed run and `charrnn eval`,
so a resumed run sees exactly the ids it was trained on (the corpus fingerprint checks it).
Prose is one id stream (memory-mapped when a cache path is given); lists of short items
(`--lines`) are one id array per line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn.config import TrainConfig
from charrnn.data import (
    CorpusError,
    check_encoding,
    encode_corpus,
    fingerprint,
    looks_like_lines,
    read_lines,
    scan_counts,
    split_lines,
    split_stream,
)
from charrnn.vocab import Vocab

# Enough of the first file to judge whether it is a list of short items.
_DETECT_BYTES = 1 << 16


@dataclass
class Dataset:
    vocab: Vocab
    lines: bool  # one example per line (else one character stream)
    train: object  # stream: (N,) ids; lines: list of (n_i,) id arrays
    val: object
    test: object
    seen: list[str] | None  # lines mode: every distinct line of the corpus (novelty filter)
    fingerprint: str
    paths: list[str]

    @property
    def train_targets(self) -> int:
        """Predicted tokens in one pass over the training split."""
        if self.lines:
            return int(sum(len(x) + 1 for x in self.train))
        return max(len(self.train) - 1, 0)


def detect_lines(paths, encoding: str) -> bool:
    """Guess from the start of the first file whether the corpus is a list of short items."""
    check_encoding(encoding)  # before decoding with it: an unknown name is the user's typo
    if encoding == "bytes":
        return False
    with open(paths[0], "rb") as f:
        head = f.read(_DETECT_BYTES)
    text = head.decode(encoding, errors="ignore").splitlines()
    if len(head) == _DETECT_BYTES:
        text = text[:-1]  # the last line may be cut
    return looks_like_lines([t for t in text if t])


def build_dataset(paths, cfg: TrainConfig, vocab: Vocab | None = None,
                  cache: Path | None = None, fp: str | None = None) -> Dataset:
    """Read `paths` per `cfg` (lines, encoding, max_vocab, splits). With `vocab` given (resume,
    eval) it is reused; `cache` is where a prose corpus's id array is memory-mapped; `fp` is
    the files' fingerprint when the caller has already read them for it."""
    paths = [str(p) for p in paths]
    if not paths:
        raise CorpusError("no corpus files given")
    for p in paths:
        if not Path(p).is_file():
            raise CorpusError(f"corpus file not found: {p}" if not Path(p).exists() else f"{p} is not a file")
    if cfg.lines and cfg.encoding == "bytes":
        raise CorpusError("--lines and --encoding bytes cannot be combined; pick one")
    fp = fp or fingerprint(paths)
    if cfg.lines:
        items = read_lines(paths, cfg.encoding)
        if not items:
            raise CorpusError(f"{paths[0]} has no non-empty lines")
        if vocab is None:
            vocab = Vocab.build(Counter("".join(items)), max_vocab=cfg.max_vocab, lines=True)
        try:
            encoded = [np.asarray(vocab.encode(s)) for s in items]
        except ValueError as e:
            raise CorpusError(f"{', '.join(paths)}: {e}") from None
        tr, va, te = split_lines(len(items), cfg.val_frac, cfg.test_frac, cfg.test_count, cfg.split_seed)
        pick = lambda idx: [encoded[i] for i in idx]
        seen = sorted(set(items))
        return Dataset(vocab, True, pick(tr), pick(va), pick(te), seen, fp, paths)
    kind = "bytes" if cfg.encoding == "bytes" else "text"
    if vocab is None:
        vocab = Vocab.build(scan_counts(paths, cfg.encoding), max_vocab=cfg.max_vocab, kind=kind)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    ids = encode_corpus(paths, vocab, cfg.encoding, out=cache)
    train, val, test = split_stream(ids, cfg.val_frac, cfg.test_frac)
    return Dataset(vocab, False, train, val, test, None, fp, paths)
