"""The vocabulary: characters (or bytes) <-> integer ids.

A Vocab is built once from the corpus character counts, stored in every checkpoint
(`to_dict`/`from_dict`), and used to encode corpora and prime text and to decode samples.
Encoding is vectorised over code points so that a 100 MB corpus encodes in chunks at
numpy speed, never a Python loop per character.

Ids: specials first ("<eos>" in lines mode, then "<unk>" when `max_vocab` dropped
characters), then the characters sorted by code point, so ids are stable for a corpus.
In bytes mode every token is a latin-1 character chr(b) standing for the byte b.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# N=text length (code points or bytes), V=vocabulary size (tokens, specials included)

EOS, UNK = "<eos>", "<unk>"
KINDS = ("text", "bytes")
_REPLACEMENT = "\ufffd"  # what <unk> decodes to: the Unicode replacement character


def _describe(cp: int, kind: str) -> str:
    """Name one character or byte for an error message: 'x' (U+0078) / byte 0xff."""
    if kind == "bytes":
        return f"byte 0x{cp:02x}"
    if 0xDC80 <= cp <= 0xDCFF:  # Python's stand-in for an undecodable input byte
        return f"byte 0x{cp - 0xDC00:02x} (the input is not valid UTF-8 there)"
    return f"character {chr(cp)!r} (U+{cp:04X})"


class Vocab:
    """Token table plus the lookup arrays that make encode/decode vectorised."""

    def __init__(self, tokens: list[str], kind: str = "text", eos_id: int | None = None,
                 unk_id: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown vocabulary kind {kind!r}; valid kinds: text, bytes")
        specials = {i for i in (eos_id, unk_id) if i is not None}
        for name, i, tok in (("eos", eos_id, EOS), ("unk", unk_id, UNK)):
            if i is None:
                continue
            if not (isinstance(i, (int, np.integer)) and 0 <= i < len(tokens)) or tokens[i] != tok:
                raise ValueError(f"{name} id {i!r} does not point at a {tok!r} token")
        chars = [t for i, t in enumerate(tokens) if i not in specials]
        for t in chars:
            if not (isinstance(t, str) and len(t) == 1):
                raise ValueError(f"vocabulary token {t!r} is not a single character")
            if kind == "bytes" and ord(t) > 255:
                raise ValueError(f"bytes vocabulary token {t!r} is not a byte (latin-1 char)")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary has duplicate characters")
        if not chars:
            raise ValueError("vocabulary has no characters; build it from a non-empty corpus")
        eos_id, unk_id = (None if i is None else int(i) for i in (eos_id, unk_id))
        self.tokens, self.kind, self.eos_id, self.unk_id = list(tokens), kind, eos_id, unk_id
        self.n_chars = len(chars)

        # Encode table: code point -> id, -1 = not in the vocabulary. One extra sentinel
        # slot at the end so out-of-range code points can be clipped onto it.
        top = 256 if kind == "bytes" else max(11, max(ord(c) for c in chars) + 1)
        table = np.full(top + 1, -1, np.int32)  # (max code point + 2,)
        for i, t in enumerate(tokens):
            if i not in specials:
                table[ord(t)] = i
        if eos_id is not None and "\n" not in chars:
            table[10] = eos_id  # lines mode: a newline in prime text means "end/start of line"
        self._table = table
        # Decode tables: id -> code point (text) or id -> bytes (bytes mode).
        dec = [ord(t) if i not in specials else 0 for i, t in enumerate(tokens)]
        if eos_id is not None:
            dec[eos_id] = 10
        if unk_id is not None:
            dec[unk_id] = ord(_REPLACEMENT)
        self._dec_cp = np.array(dec, np.uint32)  # (V,)
        self._dec_bytes = np.array([chr(c).encode("utf-8") if c > 255 else bytes([c])
                                    for c in dec], dtype=object)  # (V,) of bytes

    @classmethod
    def build(cls, counts: Mapping[str, int], *, max_vocab: int = 0, lines: bool = False,
              kind: str = "text") -> Vocab:
        """Vocabulary for a corpus from its character counts (see module docstring)."""
        if max_vocab < 0:
            raise ValueError(f"max_vocab must be >= 0 (0 keeps all characters), got {max_vocab}")
        chars = [c for c, n in counts.items() if n > 0 and not (lines and c == "\n")]
        for c in chars:
            if not (isinstance(c, str) and len(c) == 1):
                raise ValueError(f"counts key {c!r} is not a single character")
        keep = chars
        if max_vocab and len(chars) > max_vocab:
            keep = sorted(chars, key=lambda c: (-counts[c], ord(c)))[:max_vocab]
        specials = ([EOS] if lines else []) + ([UNK] if len(keep) < len(chars) else [])
        tokens = specials + sorted(keep, key=ord)
        return cls(tokens, kind,
                   eos_id=tokens.index(EOS) if EOS in specials else None,
                   unk_id=tokens.index(UNK) if UNK in specials else None)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"Vocab(kind={self.kind!r}, {self.n_chars} chars, eos_id={self.eos_id}, "
                f"unk_id={self.unk_id})")

    @property
    def id_dtype(self) -> type:
        """Smallest unsigned dtype that holds every id (uint8 keeps corpus caches small)."""
        n = len(self.tokens)
        return np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.uint32

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str | bytes) -> np.ndarray:
        """Ids for `text`: (N,) of id_dtype. Unseen characters -> <unk>, or ValueError."""
        if self.kind == "bytes":
            if isinstance(text, str):
                text = text.encode("utf-8", "surrogateescape")  # undecodable argv bytes: the bytes
            cps = np.frombuffer(bytes(text), np.uint8)  # (N,)
        else:
            if not isinstance(text, str):
                raise TypeError(f"a text vocabulary encodes str, got {type(text).__name__}; "
                                "decode the bytes first or use a bytes-mode vocabulary")
            # surrogatepass: lone surrogates become unseen code points, not an encode crash.
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)  # (N,)
        table = self._table
        # Text: clip code points above the table onto its last slot, the -1 sentinel.
        ids = table[np.minimum(cps, len(table) - 1) if self.kind == "text" else cps]  # (N,)
        missing = ids < 0
        if missing.any():
            if self.unk_id is None:
                cp = int(cps[np.argmax(missing)])
                what = "bytes" if self.kind == "bytes" else "characters"
                raise ValueError(
                    f"{_describe(cp, self.kind)} is not in the model's vocabulary "
                    f"({self.n_chars} {what}); remove it from the input, or train on a "
                    "corpus that contains it")
            ids[missing] = self.unk_id
        return ids.astype(self.id_dtype)

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1)  # (N,)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.tokens)):
            bad = int(ids[(ids < 0) | (ids >= len(self.tokens))][0])
            raise ValueError(f"token id {bad} is out of range for a vocabulary of "
                             f"{len(self.tokens)} tokens; was it made with another vocabulary?")
        return ids

    def decode(self, ids) -> str:
        """Text for ids: <eos> -> newline, <unk> -> U+FFFD. Bytes mode decodes as UTF-8."""
        if self.kind == "bytes":
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        ids = self._check_ids(ids)
        return self._dec_cp[ids].astype("<u4").tobytes().decode("utf-32-le")

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes for ids (bytes mode only): <eos> -> b'\\n', <unk> -> UTF-8 of U+FFFD."""
        if self.kind != "bytes":
            raise ValueError("decode_bytes needs a bytes-mode vocabulary (this one is 'text'); "
                             "use decode()")
        ids = self._check_ids(ids)
        if self.unk_id is None:  # every token is one byte: a single gather
            return self._dec_cp[ids].astype(np.uint8).tobytes()
        return b"".join(self._dec_bytes[ids].tolist())

    # ---- checkpoint form ----------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able form stored in checkpoints."""
        specials = {k: v for k, v in (("eos", self.eos_id), ("unk", self.unk_id))
                    if v is not None}
        return {"kind": self.kind, "tokens": list(self.tokens), "specials": specials}

    @classmethod
    def from_dict(cls, d) -> Vocab:
        """Inverse of to_dict; a malformed dict raises ValueError naming what is wrong."""
        hint = "the checkpoint's vocabulary is malformed"
        if not isinstance(d, Mapping):
            # ValueError, not TypeError: callers catch one exception for any malformed vocab.
            raise ValueError(f"{hint}: expected a dict, got {type(d).__name__}")  # noqa: TRY004
        unknown = set(d) - {"kind", "tokens", "specials"}
        if unknown or "tokens" not in d:
            raise ValueError(f"{hint}: expected keys kind, tokens, specials, got {sorted(d)}")
        tokens, specials = d["tokens"], d.get("specials", {})
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{hint}: 'tokens' must be a list of strings")
        if not isinstance(specials, Mapping) or set(specials) - {"eos", "unk"}:
            raise ValueError(f"{hint}: 'specials' must map 'eos'/'unk' to ids, got {specials!r}")
        try:
            return cls(tokens, d.get("kind", "text"), specials.get("eos"), specials.get("unk"))
        except ValueError as e:
            raise ValueError(f"{hint}: {e}") from None
