"""Tests for charrnn.vocab: ids, specials, unk mapping, bytes mode, checkpoint form."""

import json
from collections import Counter

import numpy as np
import pytest

from charrnn.vocab import Vocab

MIXED = "naïve café — 日本語 🙂\nTab\there, done."


def test_round_trip_ascii_and_non_ascii():
    for text in ("hello world\n", MIXED):
        v = Vocab.build(Counter(text))
        ids = v.encode(text)
        assert ids.dtype == np.uint8 and ids.shape == (len(text),)  # code points, not bytes
        assert v.decode(ids) == text
        assert len(v) == len(set(text)) and v.eos_id is None and v.unk_id is None


def test_ids_are_characters_sorted_by_code_point():
    v = Vocab.build(Counter("cab🙂a"))
    assert v.tokens == ["a", "b", "c", "🙂"]
    assert v.encode("🙂cab").tolist() == [3, 2, 0, 1]


def test_specials_come_first_in_fixed_order():
    counts = Counter("aaab\nbc\n")
    v = Vocab.build(counts, lines=True, max_vocab=2)
    assert v.tokens[:2] == ["<eos>", "<unk>"] and (v.eos_id, v.unk_id) == (0, 1)
    assert "\n" not in v.tokens  # lines mode: newlines split lines, they are not tokens
    assert v.tokens[2:] == ["a", "b"]
    only_unk = Vocab.build(counts, max_vocab=2)
    assert (only_unk.eos_id, only_unk.unk_id) == (None, 0)
    only_eos = Vocab.build(counts, lines=True)
    assert (only_eos.eos_id, only_eos.unk_id) == (0, None)
    assert only_eos.tokens[1:] == ["a", "b", "c"]


def test_max_vocab_keeps_frequent_chars_and_maps_rest_to_unk():
    counts = {"a": 5, "c": 3, "b": 3, "d": 1}
    v = Vocab.build(counts, max_vocab=2)
    assert v.tokens == ["<unk>", "a", "b"]  # b beats c on the tie: lower code point
    ids = v.encode("abcdz")  # z was never seen either
    assert ids.tolist() == [1, 2, 0, 0, 0]
    assert v.decode(ids) == "ab\ufffd\ufffd\ufffd"
    # No <unk> when nothing is dropped, even with a cap.
    assert Vocab.build(counts, max_vocab=4).unk_id is None


def test_lines_mode_newline_is_eos_both_ways():
    v = Vocab.build(Counter("ab\nba\n"), lines=True)
    assert v.encode("ab\n").tolist() == [1, 2, 0]
    assert v.decode([0, 1, 2, 0]) == "\nab\n"


def test_unseen_character_error_names_char_and_code_point():
    v = Vocab.build(Counter("abc"))
    with pytest.raises(ValueError) as e:
        v.encode("abé🙂")
    msg = str(e.value)
    assert "character 'é' (U+00E9) is not in the model's vocabulary (3 characters)" in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match=r"U\+1F642"):
        v.encode("a🙂")


def test_bytes_mode_round_trip():
    data = "naïve 🙂\n".encode() + b"\xff\x00\x80"
    v = Vocab.build(Counter(chr(b) for b in data), kind="bytes")
    assert all(ord(t) < 256 for t in v.tokens) and len(v) == len(set(data))
    ids = v.encode(data)
    assert ids.shape == (len(data),)
    assert v.decode_bytes(ids) == data
    assert v.encode("naïve").tolist() == v.encode("naïve".encode()).tolist()  # str -> UTF-8
    assert v.decode(v.encode("naïve 🙂")) == "naïve 🙂"
    assert v.decode(ids).endswith("\ufffd\x00\ufffd")  # invalid UTF-8 decodes to replacements
    with pytest.raises(ValueError, match="byte 0x41"):
        v.encode(b"A")


def test_bytes_mode_unk_and_eos_decode():
    v = Vocab.build({"a": 9, "b": 1, "\n": 5}, kind="bytes", lines=True, max_vocab=1)
    assert v.decode_bytes(v.encode(b"ab\n")) == b"a\xef\xbf\xbd\n"
    assert v.decode(v.encode(b"ab\n")) == "a\ufffd\n"


def test_decode_bytes_needs_bytes_vocab_and_text_needs_str():
    v = Vocab.build(Counter("ab"))
    with pytest.raises(ValueError, match="bytes-mode"):
        v.decode_bytes([0])
    with pytest.raises(TypeError):
        v.encode(b"ab")


def test_decode_rejects_out_of_range_ids():
    v = Vocab.build(Counter("ab"))
    for bad in ([2], [-1]):
        with pytest.raises(ValueError, match=f"token id {bad[0]} is out of range"):
            v.decode(bad)


def test_id_dtype_boundaries():
    chars = [chr(0x100 + i) for i in range(300)]
    assert Vocab.build({c: 1 for c in chars[:256]}).id_dtype == np.uint8  # 256 tokens
    v = Vocab.build({c: 1 for c in chars[:256]}, lines=True)  # 257 tokens
    assert v.id_dtype == np.uint16 and v.encode(chars[255]).dtype == np.uint16
    assert v.encode(chars[255]).tolist() == [256]


def test_dict_round_trip_through_json():
    for v in (Vocab.build(Counter(MIXED), max_vocab=5, lines=True),
              Vocab.build(Counter(chr(b) for b in b"\x00\xffab"), kind="bytes")):
        d = v.to_dict()
        assert set(d) == {"kind", "tokens", "specials"}
        w = Vocab.from_dict(json.loads(json.dumps(d)))
        assert w == v and w.tokens == v.tokens and w.kind == v.kind
        assert (w.eos_id, w.unk_id) == (v.eos_id, v.unk_id)
    assert Vocab.build(Counter("ab"), max_vocab=1).to_dict()["specials"] == {"unk": 0}


@pytest.mark.parametrize("d", [
    ["a", "b"],
    {"kind": "text"},
    {"kind": "words", "tokens": ["a"], "specials": {}},
    {"kind": "text", "tokens": ["a", "a"], "specials": {}},
    {"kind": "text", "tokens": ["ab"], "specials": {}},
    {"kind": "text", "tokens": ["a", 3], "specials": {}},
    {"kind": "text", "tokens": ["a", "<eos>"], "specials": {"eos": 0}},
    {"kind": "text", "tokens": ["<eos>", "a"], "specials": {"eos": 5}},
    {"kind": "text", "tokens": ["<eos>", "a"], "specials": {"bos": 0}},
    {"kind": "text", "tokens": ["<unk>"], "specials": {"unk": 0}},
    {"kind": "bytes", "tokens": ["a", "日"], "specials": {}},
])
def test_from_dict_rejects_malformed(d):
    with pytest.raises(ValueError) as e:
        Vocab.from_dict(d)
    assert str(e.value).startswith("the checkpoint's vocabulary is malformed")
    assert "\n" not in str(e.value)


def test_build_rejects_bad_input():
    with pytest.raises(ValueError, match="no characters"):
        Vocab.build({})
    with pytest.raises(ValueError, match="not a single character"):
        Vocab.build({"ab": 1})
    with pytest.raises(ValueError, match="max_vocab"):
        Vocab.build({"a": 1}, max_vocab=-1)


def test_an_undecodable_input_byte_is_named_as_a_byte_not_a_character():
    vocab = Vocab.build(Counter("acf"))
    with pytest.raises(ValueError, match=r"byte 0xe9 \(the input is not valid UTF-8 there\) is not "
                                         r"in the model's vocabulary"):
        vocab.encode("caf\udce9")  # what Python makes of b"caf\xe9" with surrogateescape
