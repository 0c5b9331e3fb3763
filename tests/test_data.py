"""Tests for charrnn.data: chunked reading, corpus errors, splits and both batchers."""

import hashlib
import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from charrnn.data import (
    CorpusError,
    LineBatcher,
    StreamBatcher,
    encode_corpus,
    fingerprint,
    line_batches,
    looks_like_lines,
    read_lines,
    scan_counts,
    split_lines,
    split_stream,
    stream_windows,
)
from charrnn.vocab import Vocab

# The standard corpora sit beside the checkout (../shared/corpora), in CI too.
CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
SHAKESPEARE = CORPORA / "tinyshakespeare.txt"
NAMES = CORPORA / "names.txt"
MIXED = "naïve café — 日本語 🙂 end\n"  # 1-, 2-, 3- and 4-byte UTF-8 characters


def write(tmp_path, name, data) -> Path:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


# ---- reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16, 1 << 16])
def test_chunked_reading_splits_multibyte_chars_correctly(tmp_path, chunk):
    # chunk=1..3 cuts every multi-byte character across a chunk edge.
    text = MIXED * 7
    a, b = write(tmp_path, "a.txt", text), write(tmp_path, "b.txt", "Zz\n")
    assert scan_counts([a, b], chunk_bytes=chunk) == Counter(text + "Zz\n")
    v = Vocab.build(Counter(text + "Zz\n"))
    ids = encode_corpus([a, b], v, chunk_bytes=chunk)
    assert v.decode(ids) == text + "Zz\n"
    assert v.decode(encode_corpus([b, a], v, chunk_bytes=chunk)) == "Zz\n" + text  # file order


def test_scan_counts_bytes_mode(tmp_path):
    data = MIXED.encode() + b"\xff\x00"
    p = write(tmp_path, "x.bin", data)
    assert scan_counts([p], "bytes", chunk_bytes=3) == Counter(chr(b) for b in data)


def test_large_corpus_across_many_chunks(tmp_path):
    # ~20 MB of random 1- to 4-byte characters, read 64 KB at a time.
    alphabet = np.array([ord(c) for c in "ab \n.é—日🙂"], np.uint32)
    rng = np.random.default_rng(0)
    cps = alphabet[rng.integers(0, len(alphabet), 11_000_000)]  # (N,)
    text = cps.astype("<u4").tobytes().decode("utf-32-le")
    p = write(tmp_path, "big.txt", text)
    assert p.stat().st_size > 20_000_000
    counts = scan_counts([p], chunk_bytes=1 << 16)
    assert counts == {chr(c): int(n) for c, n in zip(*np.unique(cps, return_counts=True))}
    v = Vocab.build(counts)
    ids = encode_corpus([p], v, out=tmp_path / "big.ids", chunk_bytes=1 << 16)
    assert isinstance(ids, np.memmap) and ids.shape == cps.shape
    assert np.array_equal(ids, v.encode(text))


def test_encode_corpus_memmap_equals_in_memory(tmp_path):
    p = write(tmp_path, "a.txt", MIXED * 50)
    v = Vocab.build(scan_counts([p]))
    mem = encode_corpus([p], v)
    out = tmp_path / "ids.bin"
    mm = encode_corpus([p], v, out=out, chunk_bytes=7)
    assert type(mem) is np.ndarray and isinstance(mm, np.memmap) and mm.mode == "r"
    assert mm.dtype == v.id_dtype and np.array_equal(mm, mem)
    assert out.stat().st_size == mem.nbytes
    assert not (tmp_path / "ids.bin.tmp").exists()
    with pytest.raises(ValueError):
        mm[0] = 1  # read-only


def test_encode_corpus_errors(tmp_path):
    p = write(tmp_path, "a.txt", "abc\n")
    v = Vocab.build(Counter("ab\n"))
    with pytest.raises(CorpusError, match=r"a\.txt: character 'c' \(U\+0063\)"):
        encode_corpus([p], v)
    with pytest.raises(CorpusError, match="--encoding bytes"):
        encode_corpus([p], v, encoding="bytes")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 16])
@pytest.mark.parametrize("data", [
    ("héllo wörld\n" * 100).encode()[:777] + b"\xff" + b"tail",  # stray byte deep in the file
    b"ab" + "日".encode()[:2] + b"cd",  # sequence cut short mid-file
    b"abc" + "🙂".encode()[:3],  # sequence cut short by the end of the file
])
def test_undecodable_byte_offset_is_exact(tmp_path, chunk, data):
    p = write(tmp_path, "bad.txt", data)
    with pytest.raises(UnicodeDecodeError) as truth:
        data.decode("utf-8")
    at = truth.value.start
    with pytest.raises(CorpusError) as e:
        scan_counts([p], chunk_bytes=chunk)
    assert str(e.value) == (f"{p}: not valid utf-8 at byte offset {at} (byte 0x{data[at]:02x}); "
                            "try --encoding latin-1 or --encoding bytes")
    assert scan_counts([p], "latin-1", chunk_bytes=chunk) == Counter(data.decode("latin-1"))


def test_undecodable_offset_in_unbuffered_codec(tmp_path):
    p = write(tmp_path, "w.txt", b"x" * 100 + b"\x81")  # 0x81 is undefined in cp1252
    with pytest.raises(CorpusError, match="not valid cp1252 at byte offset 100 \\(byte 0x81\\)"):
        scan_counts([p], "cp1252", chunk_bytes=32)


def test_file_errors(tmp_path):
    empty = write(tmp_path, "empty.txt", b"")
    with pytest.raises(CorpusError, match="^corpus .*empty.txt is empty$"):
        scan_counts([empty])
    with pytest.raises(CorpusError, match="^corpus file not found: .*nope.txt$"):
        scan_counts([tmp_path / "nope.txt"])
    with pytest.raises(CorpusError, match="is a directory"):
        encode_corpus([tmp_path], Vocab.build(Counter("a")))
    with pytest.raises(CorpusError, match="^unknown encoding 'nope'"):
        scan_counts([write(tmp_path, "ok.txt", "a")], "nope")
    with pytest.raises(CorpusError, match="unknown encoding 'base64'"):
        read_lines([tmp_path / "ok.txt"], "base64")
    with pytest.raises(CorpusError, match="no corpus files"):
        scan_counts([])


def test_binary_files_need_bytes_mode(tmp_path):
    p = write(tmp_path, "blob.bin", b"GIF89a" + bytes(range(256)) * 4)
    with pytest.raises(CorpusError, match=r"blob\.bin looks binary \(NUL bytes\); use --encoding"):
        scan_counts([p], "latin-1")
    assert sum(scan_counts([p], "bytes").values()) == p.stat().st_size
    # UTF-16 text is full of NULs but is not binary.
    q = write(tmp_path, "u16.txt", MIXED.encode("utf-16"))
    assert scan_counts([q], "utf-16", chunk_bytes=3) == Counter(MIXED)


def test_read_lines(tmp_path):
    a = write(tmp_path, "a.txt", "emma\r\nolivia\n\n\r\nava")  # CRLF, blank lines, no final \n
    b = write(tmp_path, "b.txt", "zoë\n")
    assert read_lines([a, b]) == ["emma", "olivia", "ava", "zoë"]
    assert read_lines([b], "bytes") == ["zoë".encode()]
    with pytest.raises(CorpusError, match="no non-empty lines"):
        read_lines([write(tmp_path, "blank.txt", "\n\r\n\n")])
    names = read_lines([NAMES])
    assert len(names) == 32033 and names[:2] == ["emma", "olivia"]


def test_looks_like_lines():
    assert looks_like_lines(read_lines([NAMES])[:2000])
    assert not looks_like_lines(read_lines([SHAKESPEARE])[:2000])
    assert not looks_like_lines(["bob"] * 99)
    assert looks_like_lines(["bob"] * 99 + ["x" * 80])  # one outlier is within the 1%
    assert not looks_like_lines(["bob"] * 98 + ["x" * 80] * 2)


def test_fingerprint(tmp_path):
    a, b = write(tmp_path, "a.txt", "one\n"), write(tmp_path, "b.txt", "two\n")
    assert fingerprint([a]) == "sha256:" + hashlib.sha256(b"one\n").hexdigest()
    assert fingerprint([a, b]) == "sha256:" + hashlib.sha256(b"one\ntwo\n").hexdigest()
    assert fingerprint([a, b]) != fingerprint([b, a])


# ---- splits -------------------------------------------------------------------------------

def test_split_stream_matches_nanogpt_on_tinyshakespeare():
    v = Vocab.build(scan_counts([SHAKESPEARE]))
    ids = encode_corpus([SHAKESPEARE], v)
    train, val, test = split_stream(ids, 0.1)
    assert (len(ids), len(train), len(val), len(test)) == (1115394, 1003854, 111540, 0)
    assert v.decode(val[:10]) == SHAKESPEARE.read_text()[1003854:1003864]


def test_split_stream_views_and_boundaries(tmp_path):
    ids = np.arange(10)
    train, val, test = split_stream(ids, 0.2, 0.1)
    assert (train.tolist(), val.tolist(), test.tolist()) == ([0, 1, 2, 3, 4, 5, 6], [7, 8], [9])
    assert np.shares_memory(train, ids) and np.shares_memory(test, ids)
    p = write(tmp_path, "a.txt", "abcdefghij")
    mm = encode_corpus([p], Vocab.build(Counter("abcdefghij")), out=tmp_path / "ids")
    train, val, _ = split_stream(mm, 0.3)
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap)  # slices, not copies
    for bad in ((1.0, 0.0), (0.6, 0.4), (-0.1, 0.0)):
        with pytest.raises(ValueError, match="--val-frac"):
            split_stream(ids, *bad)


def test_split_lines_partition():
    train, val, test = split_lines(32033, 0.05, test_count=1000)
    assert (len(test), len(val), len(train)) == (1000, 1601, 32033 - 2601)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(32033))
    again = split_lines(32033, 0.05, test_count=1000)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))
    other = split_lines(32033, 0.05, test_count=1000, seed=1)
    assert not np.array_equal(other[2], test)
    assert len(split_lines(100, 0.1, test_frac=0.2)[2]) == 20
    with pytest.raises(CorpusError, match="--test-count"):
        split_lines(50, 0.1, test_count=45)


# ---- stream batches -----------------------------------------------------------------------

def epoch_batches(batcher):
    """All batches of the batcher's next epoch."""
    out = [batcher.next()]
    while out[-1].epoch != int(out[-1].epoch):
        out.append(batcher.next())
    return out


def test_stream_batches_shifted_contiguous_and_reset_at_epoch_start():
    n, bsz, t = 1000, 4, 10
    sb = StreamBatcher(np.arange(n), bsz, t, seed=0)  # ids = positions
    offsets = []
    for epoch in range(12):
        batches = epoch_batches(sb)
        o, s = sb.offset, (n - sb.offset - 1) // bsz
        offsets.append(o)
        assert len(batches) == sb.windows_per_epoch == s // t
        assert [b.reset for b in batches] == [True] + [False] * (len(batches) - 1)
        assert batches[-1].epoch == epoch + 1
        assert batches[0].x[0].tolist() == [o + k * s for k in range(bsz)]  # stream starts
        for b in batches:
            assert b.x.shape == b.y.shape == (t, bsz) and b.x.dtype == b.y.dtype == np.int32
            assert b.mask is None and np.array_equal(b.y, b.x + 1)
        for prev, cur in pairwise(batches):
            assert np.array_equal(cur.x[0], prev.y[-1])  # each stream continues where it stopped
        seen = np.concatenate([b.x.ravel() for b in batches])
        assert len(np.unique(seen)) == len(seen)  # streams do not overlap
    assert len(set(offsets)) > 3 and all(0 <= o < t for o in offsets)
    fixed = StreamBatcher(np.arange(n), bsz, t, seed=0, shift=False)
    assert {epoch_batches(fixed)[0].x[0, 0] for _ in range(3)} == {0}


def test_stream_batches_follow_the_text(tmp_path):
    text = SHAKESPEARE.read_text()
    v = Vocab.build(scan_counts([SHAKESPEARE]))
    ids = encode_corpus([SHAKESPEARE], v, out=tmp_path / "ids")
    train = split_stream(ids, 0.1)[0]
    sb = StreamBatcher(train, 8, 50, seed=3)
    for _ in range(3):
        b = sb.next()
    start = sb.offset + 5 * sb.stream_len + 2 * 50
    assert type(b.x) is np.ndarray
    assert v.decode(b.x[:, 5]) == text[start:start + 50]
    assert v.decode(b.y[:, 5]) == text[start + 1:start + 51]


def test_stream_batcher_too_small():
    with pytest.raises(CorpusError, match="training split has 100 characters; batch size 4 x "
                       "window 30 needs at least 150 .*; lower --batch-size or --seq-len"):
        StreamBatcher(np.arange(100), 4, 30, seed=0)
    # One window fits at offset 0 but not at the largest shift, so a later epoch would fail.
    StreamBatcher(np.arange(42), 4, 10, seed=0, shift=False)
    with pytest.raises(CorpusError):
        StreamBatcher(np.arange(42), 4, 10, seed=0)


def assert_same_batches(a, b, k):
    for _ in range(k):
        x, y = a.next(), b.next()
        assert np.array_equal(x.x, y.x) and np.array_equal(x.y, y.y)
        assert (x.reset, x.epoch) == (y.reset, y.epoch)
        assert (x.mask is None and y.mask is None) or np.array_equal(x.mask, y.mask)


@pytest.mark.parametrize("k", [0, 5, 23, 24, 30])
def test_stream_batcher_exact_resume(k):
    ids = np.arange(1000)
    a = StreamBatcher(ids, 4, 10, seed=7)
    assert a.windows_per_epoch == 24  # so k = 23, 24 sit at the epoch boundary
    for _ in range(k):
        a.next()
    b = StreamBatcher(ids, 4, 10, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert_same_batches(a, b, 60)
    with pytest.raises(ValueError, match="--batch-size"):
        StreamBatcher(ids, 5, 10, seed=7).load_state_dict(a.state_dict())


def test_stream_windows_cover_split():
    n, bsz, t = 1000, 4, 30
    wins = list(stream_windows(np.arange(n), bsz, t))
    s = (n - 1) // bsz
    assert [x.shape for x, _ in wins] == [(t, bsz)] * (s // t) + [(s % t, bsz)]
    for (_, y), (x2, _) in pairwise(wins):
        assert np.array_equal(x2[0], y[-1])  # state carries across windows
    ys = np.concatenate([y for _, y in wins])  # (S, B)
    assert np.array_equal(ys, np.concatenate([x for x, _ in wins]) + 1)
    assert np.array_equal(np.sort(ys.ravel()), np.arange(1, bsz * s + 1))
    (x, y), = stream_windows(np.arange(20), 8, 30)  # too short for 8 streams: one stream
    assert x.shape == (19, 1) and y[-1, 0] == 19
    with pytest.raises(CorpusError, match="--val-frac"):
        stream_windows(np.arange(1), 4, 10)


# ---- line batches -------------------------------------------------------------------------

def make_lines(n=103, seed=0):
    """Line i is (i+1) repeated: any column of x tells which line it holds."""
    lengths = np.random.default_rng(seed).integers(1, 13, n)
    return [np.full(k, i + 1, np.uint8) for i, k in enumerate(lengths)], lengths


def check_line_batch(b, lines, eos=0):
    assert b.reset and b.x.dtype == b.y.dtype == np.int32 and b.mask.dtype == np.float32
    who = b.x[1] - 1  # (B,)
    lens = np.array([len(lines[i]) for i in who])
    assert b.x.shape[0] == lens.max() + 1
    for j, (i, k) in enumerate(zip(who, lens)):
        assert b.x[0, j] == eos and b.y[k, j] == eos
        assert np.array_equal(b.x[1:k + 1, j], lines[i]) and np.array_equal(b.y[:k, j], lines[i])
        assert b.mask[:, j].tolist() == [1.0] * (k + 1) + [0.0] * (len(b.mask) - k - 1)
        assert (b.x[k + 1:, j] == eos).all() and (b.y[k + 1:, j] == eos).all()
    return who, lens


def test_line_batches_each_line_once_per_epoch_bucketed_and_masked():
    lines, lengths = make_lines()
    lb = LineBatcher(lines, 10, eos_id=0, seed=1)
    assert lb.windows_per_epoch == 11
    sorted_lengths = np.sort(lengths)
    epochs = []
    for epoch in range(2):
        batches, slots = epoch_batches(lb), []
        assert len(batches) == 11 and batches[-1].epoch == epoch + 1
        who = []
        for b in batches:
            w, lens = check_line_batch(b, lines)
            who.append(w)
            assert b.mask.sum() == (lens + 1).sum()
            # lengths come from one consecutive block of the sorted lengths
            blocks = [sorted_lengths[k * 10:k * 10 + 10] for k in range(11)]
            slots.append(next(k for k, bl in enumerate(blocks)
                              if np.array_equal(np.sort(lens), bl)))
        assert np.array_equal(np.sort(np.concatenate(who)), np.arange(103))
        assert slots != sorted(slots)  # batch order is shuffled
        epochs.append([set(w) for w in who])
    assert epochs[0] != epochs[1]  # equal-length lines land in different batches each epoch


@pytest.mark.parametrize("k", [0, 4, 10, 11, 15])
def test_line_batcher_exact_resume(k):
    lines, _ = make_lines()
    a = LineBatcher(lines, 10, eos_id=0, seed=5)
    for _ in range(k):
        a.next()
    b = LineBatcher(lines, 10, eos_id=0, seed=6)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert_same_batches(a, b, 30)
    with pytest.raises(ValueError, match="same corpus"):
        LineBatcher(lines[:-1], 10, eos_id=0, seed=5).load_state_dict(a.state_dict())


def test_line_batches_for_evaluation():
    lines, _ = make_lines()
    batches = list(line_batches(lines, 16, eos_id=0))
    who = [check_line_batch(b, lines)[0] for b in batches]
    assert np.array_equal(np.sort(np.concatenate(who)), np.arange(103))
    assert [len(b.x) for b in batches] == sorted(len(b.x) for b in batches)
    assert batches[-1].epoch == 1.0 and len(batches) == 7
    with pytest.raises(ValueError, match="lines=True"):
        LineBatcher(lines, 4, eos_id=None, seed=0)
    with pytest.raises(CorpusError):
        line_batches([], 4, eos_id=0)


@pytest.mark.parametrize("B,T,shift", [(4, 8, True), (4, 8, False), (1, 1, True)])
def test_a_split_too_small_for_the_batch_says_how_much_it_needs(B, T, shift):
    need = B * T + (T if shift else 1)
    StreamBatcher(np.zeros(need, np.int32), B, T, seed=0, shift=shift)  # just enough
    with pytest.raises(CorpusError, match=f"has {need - 1} characters; batch size {B} x window "
                                          f"{T} needs at least {need} "):
        StreamBatcher(np.zeros(need - 1, np.int32), B, T, seed=0, shift=shift)


@pytest.mark.parametrize("codec", ["utf-16", "utf-32"])  # UTF-32-LE's mark begins as UTF-16's
def test_utf16_and_utf32_text_is_named_as_such_not_called_binary(tmp_path, codec):
    path = tmp_path / "wide.txt"
    path.write_text("hello world\n" * 20, encoding=codec)
    with pytest.raises(CorpusError, match=f"is {codec.upper()} text .*; use --encoding {codec}"):
        scan_counts([path])
    assert scan_counts([path], codec) == Counter("hello world\n" * 20)
