"""Corpus -> ids -> batches: reading, train/val/test splits and the two batchers.

Reading is chunked through an incremental decoder, so memory stays bounded and a 100 MB
corpus never lives as one Python string; `encode_corpus(out=...)` leaves the ids in a
read-only memmap. Prose trains on StreamBatcher (B parallel streams cut into T-step
windows, hidden state carried between windows: stateful truncated BPTT); lists of short
items (names) train on LineBatcher (one example per line, padded, masked).
Both batchers save their position with `state_dict` so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn.vocab import Vocab

# N=corpus length (ids), B=batch (streams or lines), T=time (window, or longest line + 1),
# S=stream length, W=windows per epoch

_SNIFF_BYTES = 8192  # how much of each file the binary check looks at


class CorpusError(ValueError):
    """A problem with the user's corpus or data options; the one-line message is for the user."""


# ---- reading ------------------------------------------------------------------------------

def _paths(paths) -> list[Path]:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise CorpusError("no corpus files given; pass at least one text file")
    return [Path(p) for p in paths]


def check_encoding(encoding: str) -> None:
    if encoding == "bytes":
        return
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    # base64, rot13 and friends are codecs too, but they do not turn bytes into text.
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise CorpusError(f"unknown encoding {encoding!r}; use a text codec such as utf-8 or "
                          "latin-1, or bytes")


def check_file(path: Path) -> None:
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if path.is_dir():
        raise CorpusError(f"corpus path {path} is a directory; pass the text files inside it")
    if not path.is_file():  # a pipe (<(...)), a FIFO, a device: read more than once here
        raise CorpusError(f"corpus {path} is not a regular file (a pipe can be read only once); "
                          "save it to a file first")
    if path.stat().st_size == 0:
        raise CorpusError(f"corpus {path} is empty")


def _chunks(path: Path, encoding: str, chunk_bytes: int):
    """Decoded pieces (str) of one file, or raw byte pieces when encoding == "bytes"."""
    check_file(path)
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    with open(path, "rb") as f:
        if encoding == "bytes":
            while chunk := f.read(chunk_bytes):
                yield chunk
            return
        # UTF-16/32 text is full of NULs, so the binary sniff would misfire there.
        wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
        head = f.read(_SNIFF_BYTES)
        for bits, boms in ((32, (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)),  # FF FE 00 00 first
                           (16, (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))):
            if not wide and head.startswith(boms):
                raise CorpusError(f"{path} is UTF-{bits} text (it starts with a byte-order "
                                  f"mark); use --encoding utf-{bits}")
        if not wide and b"\0" in head:
            raise CorpusError(f"{path} looks binary (NUL bytes); use --encoding bytes to model "
                              "raw bytes")
        f.seek(0)
        dec = codecs.getincrementaldecoder(encoding)(errors="strict")
        start = 0  # file offset of `chunk`
        while True:
            chunk = f.read(chunk_bytes)
            # The decoder holds back an incomplete sequence from the previous chunk and
            # reports error positions within (held-back + chunk), hence the correction.
            held = len(dec.getstate()[0])
            try:
                text = dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}: not valid {encoding} at byte offset {start - held + e.start} "
                    f"(byte 0x{e.object[e.start]:02x}); try --encoding latin-1 or "
                    "--encoding bytes") from None
            except UnicodeError as e:  # e.g. UTF-16 without a byte-order mark
                raise CorpusError(f"{path}: not valid {encoding} ({e}); try --encoding utf-8, "
                                  "--encoding latin-1 or --encoding bytes") from None
            if text:
                yield text
            if not chunk:
                return
            start += len(chunk)


def _code_points(piece: str | bytes) -> np.ndarray:
    if isinstance(piece, bytes):
        return np.frombuffer(piece, np.uint8)  # (n,)
    return np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), np.uint32)  # (n,)


# Bytes read per chunk. A chunk's text is widened to UTF-32 and sorted to count it, so the
# transient peak is ~8x this: 4 MiB keeps a 50 MB corpus's whole preparation near 110 MiB
# resident (16 MiB chunks: 320 MiB), at no measurable cost in speed.
CHUNK_BYTES = 1 << 22


def scan_counts(paths, encoding: str = "utf-8", chunk_bytes: int = CHUNK_BYTES) -> Counter:
    """Character counts over all files (keys chr(b) per byte value in bytes mode)."""
    check_encoding(encoding)
    total = np.zeros(0, np.int64)  # (max code point + 1,)
    for path in _paths(paths):
        for piece in _chunks(path, encoding, chunk_bytes):
            c = np.bincount(_code_points(piece))
            if len(c) > len(total):
                total = np.pad(total, (0, len(c) - len(total)))
            total[: len(c)] += c
    return Counter({chr(cp): int(total[cp]) for cp in np.flatnonzero(total)})


def encode_corpus(paths, vocab: Vocab, encoding: str = "utf-8", out: Path | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """All files, in order, as one (N,) id array of vocab.id_dtype; a read-only memmap at
    `out` when given (written to a temporary name, then renamed, so no half file is left)."""
    check_encoding(encoding)
    if (encoding == "bytes") != (vocab.kind == "bytes"):
        raise CorpusError(f"a {vocab.kind} vocabulary cannot encode a corpus read with encoding "
                          f"{encoding!r}; use --encoding bytes exactly when the model is bytes")

    def pieces():
        for path in _paths(paths):
            for piece in _chunks(path, encoding, chunk_bytes):
                try:
                    yield vocab.encode(piece)
                except ValueError as e:
                    raise CorpusError(f"{path}: {e}") from None

    if out is None:
        return np.concatenate(list(pieces()))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.writelines(ids.tobytes() for ids in pieces())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return np.memmap(out, dtype=vocab.id_dtype, mode="r")


def read_lines(paths, encoding: str = "utf-8") -> list[str] | list[bytes]:
    """Non-empty lines of all files, newline ("\\n" or "\\r\\n") stripped.
    In bytes mode the lines are bytes, ready for a bytes Vocab's encode()."""
    check_encoding(encoding)
    nl, cr = (b"\n", b"\r") if encoding == "bytes" else ("\n", "\r")
    lines = []
    for path in _paths(paths):
        text = nl[:0].join(_chunks(path, encoding, CHUNK_BYTES))
        for line in text.split(nl):
            line = line[:-1] if line.endswith(cr) else line
            if line:
                lines.append(line)
    if not lines:
        raise CorpusError(f"corpus {', '.join(map(str, _paths(paths)))} has no non-empty lines")
    return lines


def looks_like_lines(lines_sample: list[str]) -> bool:
    """True for list-like corpora (names, words): >= 100 lines, 99% of them <= 24 chars."""
    lengths = np.array([len(line) for line in lines_sample if line])  # (n,)
    return len(lengths) >= 100 and float(np.percentile(lengths, 99)) <= 24


def fingerprint(paths) -> str:
    """"sha256:<hex>" of the files' contents concatenated in order (equals sha256sum for one
    file): the checkpoint records it so a resume on a different corpus is caught."""
    h = hashlib.sha256()
    for path in _paths(paths):
        check_file(path)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


# ---- splits -------------------------------------------------------------------------------

def _check_fracs(val_frac: float, test_frac: float) -> None:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac {val_frac} and test_frac {test_frac} must be in [0, 1) with "
                         "a sum < 1; lower --val-frac or --test-frac")


def split_stream(ids: np.ndarray, val_frac: float, test_frac: float = 0.0):
    """(train, val, test) contiguous views of `ids`, in that order: the held-out text is the
    end of the corpus. val_frac=0.1 reproduces nanoGPT's shakespeare_char split exactly."""
    _check_fracs(val_frac, test_frac)
    n = len(ids)
    a, b = int(n * (1 - val_frac - test_frac)), int(n * (1 - test_frac))
    return ids[:a], ids[a:b], ids[b:]


def split_lines(n: int, val_frac: float, test_frac: float = 0.0, test_count: int = 0,
                seed: int = 3407):
    """(train, val, test) index arrays into n lines: a seeded random partition."""
    _check_fracs(val_frac, test_frac)
    if test_count < 0:
        raise ValueError(f"test_count must be >= 0, got {test_count}")
    perm = np.random.default_rng(seed).permutation(n)  # (n,)
    n_test = test_count or int(n * test_frac)
    n_val = int(n * val_frac)
    if n_test + n_val >= n:
        raise CorpusError(f"{n} lines leave none for training after {n_test} test and {n_val} "
                          "validation lines; lower --test-count, --test-frac or --val-frac")
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


# ---- batches ------------------------------------------------------------------------------

@dataclass
class Batch:
    x: np.ndarray  # (T, B) int32 input ids, time-major
    y: np.ndarray  # (T, B) int32 target ids (x shifted by one)
    mask: np.ndarray | None  # (T, B) float32, 1 = real target, 0 = padding; None for streams
    reset: bool  # the carried hidden state must be zeroed before this batch
    epoch: float  # fractional epochs completed after this batch


def _gather(ids: np.ndarray, starts: np.ndarray, length: int):
    """x, y (length, B) int32 for streams beginning at `starts` (B,); reads only those ids,
    so a memmapped corpus is never copied whole."""
    idx = starts[None, :] + np.arange(length + 1)[:, None]  # (length+1, B)
    chunk = np.asarray(ids[idx], dtype=np.int32)  # (length+1, B)
    return chunk[:-1], chunk[1:].copy()


def _check_state(d: dict, expect: dict) -> None:
    saved = {k: d.get(k) for k in expect}
    if saved != expect:
        raise ValueError(f"batcher state was saved for {saved} but this run has {expect}; resume "
                         "with the same corpus, --batch-size and --seq-len")


class StreamBatcher:
    """B parallel streams over the training ids, T-step windows, state carried between windows
    (stateful TBPTT). Each epoch starts at a random offset in [0, T) so windows do not always
    cut the text at the same places."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 shift: bool = True):
        if np.ndim(ids) != 1:
            raise ValueError(f"ids must be 1-D, got shape {np.shape(ids)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be > 0, got {batch_size}, {seq_len}")
        self.ids, self.n, self.B, self.T, self.shift = ids, len(ids), batch_size, seq_len, shift
        # The largest offset gives the fewest windows; every epoch must have at least one.
        if (self.n - (seq_len - 1 if shift else 0) - 1) // batch_size // seq_len < 1:
            need = batch_size * seq_len + (seq_len if shift else 1)  # + the epoch's random shift
            hint = ("lower --batch-size or --seq-len" if batch_size * seq_len > 1 else
                    "the corpus is too short to train on")
            raise CorpusError(f"the training split has {self.n:,} characters; batch size "
                              f"{batch_size} x window {seq_len} needs at least {need:,} (a "
                              f"window per stream, plus a window's random shift); {hint}")
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self._start_epoch(int(self.rng.integers(0, seq_len)) if shift else 0)

    def _start_epoch(self, offset: int) -> None:
        self.offset = offset
        self.stream_len = (self.n - offset - 1) // self.B  # S
        self.windows_per_epoch = self.stream_len // self.T  # W
        self.window = 0  # next window to hand out

    def next(self) -> Batch:
        if self.window == self.windows_per_epoch:
            self.epoch += 1
            self._start_epoch(int(self.rng.integers(0, self.T)) if self.shift else 0)
        w = self.window
        starts = self.offset + np.arange(self.B) * self.stream_len + w * self.T  # (B,)
        x, y = _gather(self.ids, starts, self.T)  # (T, B) each
        self.window += 1
        return Batch(x, y, None, reset=w == 0,
                     epoch=self.epoch + self.window / self.windows_per_epoch)

    def _shape(self) -> dict:
        return {"kind": "stream", "n": self.n, "batch_size": self.B, "seq_len": self.T,
                "shift": self.shift}

    def state_dict(self) -> dict:
        return {**self._shape(), "epoch": self.epoch, "window": self.window,
                "offset": self.offset, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        _check_state(d, self._shape())
        self.rng.bit_generator.state = d["rng"]
        self.epoch = int(d["epoch"])
        self._start_epoch(int(d["offset"]))
        if not 0 <= d["window"] <= self.windows_per_epoch:
            raise ValueError(f"batcher state window {d['window']} is outside this epoch's "
                             f"{self.windows_per_epoch} windows; the state is corrupt")
        self.window = int(d["window"])


def stream_windows(ids: np.ndarray, batch_size: int, seq_len: int):
    """Deterministic evaluation windows over a whole split, state carried: yields (x, y),
    each (t, B_eval) int32 with t = seq_len except a shorter last window. B_eval streams of
    S = (N-1) // B_eval targets each cover B_eval*S targets (all but < B_eval of them;
    evaluate_stream scores the rest from the last stream's state)."""
    n = len(ids)
    if n < 2:
        raise CorpusError(f"evaluation split has {n} characters, needs at least 2; raise "
                          "--val-frac (or --test-frac)")
    b = max(1, min(batch_size, (n - 1) // seq_len))
    stream_len = (n - 1) // b  # S
    base = np.arange(b) * stream_len  # (B_eval,)

    def windows():
        for start in range(0, stream_len, seq_len):
            yield _gather(ids, base + start, min(seq_len, stream_len - start))

    return windows()


def _pad_lines(lines: list[np.ndarray], lengths: np.ndarray, idx: np.ndarray, eos_id: int):
    """x, y, mask (T, B) for the lines `idx`: x = [eos] + line, y = line + [eos], eos-padded."""
    lens = lengths[idx]  # (B,)
    t = int(lens.max()) + 1
    x = np.full((t, len(idx)), eos_id, np.int32)  # (T, B)
    y = np.full((t, len(idx)), eos_id, np.int32)  # (T, B)
    mask = np.zeros((t, len(idx)), np.float32)  # (T, B)
    for j, (i, n) in enumerate(zip(idx, lens)):
        x[1:n + 1, j] = lines[i]
        y[:n, j] = lines[i]
        mask[:n + 1, j] = 1.0
    return x, y, mask


def _check_lines(lines, batch_size: int, eos_id) -> tuple[list[np.ndarray], np.ndarray]:
    if not len(lines):
        raise CorpusError("no lines to batch; check the corpus and --val-frac / --test-count")
    if batch_size < 1:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if eos_id is None:
        raise ValueError("line batches need the <eos> id; build the Vocab with lines=True")
    lines = [np.asarray(line) for line in lines]
    return lines, np.array([len(line) for line in lines], np.int64)  # (n,)


class LineBatcher:
    """One example per line: [eos] + line + [eos]; x = ex[:-1], y = ex[1:]; padded; mask marks
    real targets. Lines of similar length share a batch (less padding); batch order is random."""

    def __init__(self, lines: list[np.ndarray], batch_size: int, eos_id: int, seed: int):
        self.lines, self.lengths = _check_lines(lines, batch_size, eos_id)
        self.B, self.eos_id = batch_size, int(eos_id)
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        # Replaying the rng from here rebuilds this epoch's plan, so state_dict stays small.
        self._epoch_rng = self.rng.bit_generator.state
        order = self.rng.permutation(len(self.lines))  # (n,)
        order = order[np.argsort(self.lengths[order], kind="stable")]  # ties stay shuffled
        chunks = [order[i:i + self.B] for i in range(0, len(order), self.B)]
        self._plan = [chunks[i] for i in self.rng.permutation(len(chunks))]
        self.windows_per_epoch = len(chunks)  # batches per epoch, named as in StreamBatcher
        self.batch = 0  # next batch to hand out

    def next(self) -> Batch:
        if self.batch == self.windows_per_epoch:
            self.epoch += 1
            self._start_epoch()
        x, y, mask = _pad_lines(self.lines, self.lengths, self._plan[self.batch], self.eos_id)
        self.batch += 1
        return Batch(x, y, mask, reset=True,
                     epoch=self.epoch + self.batch / self.windows_per_epoch)

    def _shape(self) -> dict:
        return {"kind": "lines", "n": len(self.lines), "chars": int(self.lengths.sum()),
                "batch_size": self.B}

    def state_dict(self) -> dict:
        return {**self._shape(), "epoch": self.epoch, "batch": self.batch, "rng": self._epoch_rng}

    def load_state_dict(self, d: dict) -> None:
        _check_state(d, self._shape())
        self.rng.bit_generator.state = d["rng"]
        self.epoch = int(d["epoch"])
        self._start_epoch()
        if not 0 <= d["batch"] <= self.windows_per_epoch:
            raise ValueError(f"batcher state batch {d['batch']} is outside this epoch's "
                             f"{self.windows_per_epoch} batches; the state is corrupt")
        self.batch = int(d["batch"])


def line_batches(lines: list[np.ndarray], batch_size: int, eos_id: int):
    """Deterministic evaluation batches over all lines, sorted by length, each a Batch (mask
    set); `epoch` is the fraction of the lines covered so far."""
    lines, lengths = _check_lines(lines, batch_size, eos_id)
    order = np.argsort(lengths, kind="stable")  # (n,)

    def batches():
        for i in range(0, len(order), batch_size):
            x, y, mask = _pad_lines(lines, lengths, order[i:i + batch_size], int(eos_id))
            yield Batch(x, y, mask, reset=True, epoch=min(i + batch_size, len(order)) / len(order))

    return batches()
