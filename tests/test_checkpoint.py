"""Tests for charrnn.checkpoint: round trips, atomic writes, and one clear error per bad file."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy

from charrnn import checkpoint
from charrnn.checkpoint import FORMAT_VERSION, CheckpointError, load, read_meta, save


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "rnn.weight_hh_l0": rng.standard_normal((8, 2)).astype(np.float32),
        "decoder.bias": rng.standard_normal(5).astype(np.float32),
        "train.adam.v.decoder.bias": rng.random(5).astype(np.float32),
        "vocab.bytes": np.frombuffer(b"abc\xff", np.uint8).copy(),
        "data.offsets": np.array([0, 2**40, -3], np.int64),
    }


def _meta() -> dict:
    rng = np.random.default_rng(7)
    return {
        "model": {"cell": "lstm", "hidden": 8},
        "step": 12,
        "best_val": float("inf"),
        "rng": rng.bit_generator.state,  # PCG64 state: Python ints of ~128 bits
        "big": 2**200 + 1,
        "text": "héllo\n\"quoted\"",
    }


def _assert_one_line(e: CheckpointError, *parts: str) -> None:
    msg = str(e)
    assert "\n" not in msg
    assert "hint:" in msg
    for part in parts:
        assert part in msg, msg


# ---------------------------------------------------------------- round trips


def test_round_trip_tensors_and_meta(tmp_path):
    path = tmp_path / "ck.safetensors"
    tensors, meta = _tensors(), _meta()
    save(path, tensors, meta)
    got, got_meta = load(path)
    assert set(got) == set(tensors)
    for name, a in tensors.items():
        assert got[name].dtype == a.dtype
        np.testing.assert_array_equal(got[name], a)
    assert got_meta == {**meta, "format_version": FORMAT_VERSION}
    # The PCG64 state survives exactly: the restored generator draws the same numbers.
    rng = np.random.default_rng()
    rng.bit_generator.state = got_meta["rng"]
    np.testing.assert_array_equal(rng.random(3), np.random.default_rng(7).random(3))


def test_save_does_not_mutate_meta_and_returns_writable_arrays(tmp_path):
    meta = {"a": 1}
    save(tmp_path / "ck.safetensors", _tensors(), meta)
    assert meta == {"a": 1}
    got, _ = load(tmp_path / "ck.safetensors")
    got["decoder.bias"][0] = 1.0  # the trainer updates loaded weights in place


def test_half_stores_float16_and_loads_float32(tmp_path):
    tensors = _tensors()
    full, small = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save(full, tensors, {})
    save(small, tensors, {}, half=True)
    assert small.stat().st_size < full.stat().st_size
    raw = safetensors.numpy.load(small.read_bytes())
    assert raw["rnn.weight_hh_l0"].dtype == np.float16
    assert raw["train.adam.v.decoder.bias"].dtype == np.float32  # training state stays full
    assert raw["vocab.bytes"].dtype == np.uint8 and raw["data.offsets"].dtype == np.int64
    got, _ = load(small)
    for name in ("rnn.weight_hh_l0", "decoder.bias"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], tensors[name], rtol=1e-3, atol=1e-4)
        assert not np.array_equal(got[name], tensors[name])  # it really was rounded
    moment = "train.adam.v.decoder.bias"
    np.testing.assert_array_equal(got[moment], tensors[moment])
    np.testing.assert_array_equal(got["data.offsets"], tensors["data.offsets"])


def test_numpy_scalars_in_meta_become_python(tmp_path):
    save(tmp_path / "ck.safetensors", {}, {"loss": np.float32(1.5), "ids": np.arange(3)})
    _, meta = load(tmp_path / "ck.safetensors")
    assert meta["loss"] == 1.5 and meta["ids"] == [0, 1, 2]


def test_unserialisable_meta_raises_one_line(tmp_path):
    with pytest.raises(CheckpointError) as e:
        save(tmp_path / "ck.safetensors", {}, {"f": object()})
    _assert_one_line(e.value, "not JSON-serialisable")
    assert not os.listdir(tmp_path)


def test_creates_parent_directories(tmp_path):
    path = tmp_path / "runs" / "a" / "latest.safetensors"
    save(path, _tensors(), {})
    assert load(path)[1]["format_version"] == FORMAT_VERSION


def test_read_meta_equals_load_meta_without_reading_tensors(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    save(path, _tensors(), _meta())
    _, meta = load(path)

    def no_tensors(*args, **kwargs):
        raise AssertionError("read_meta must not deserialise tensors")

    monkeypatch.setattr(safetensors.numpy, "load", no_tensors)
    assert read_meta(path) == meta


# ---------------------------------------------------------------- atomic writes


def _crash_case(tmp_path, monkeypatch, target: str, exc: BaseException):
    path = tmp_path / "latest.safetensors"
    old = _tensors(0)
    save(path, old, {"step": 1})

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(checkpoint.os, target, boom)
    return path, old


@pytest.mark.parametrize("target", ["fsync", "replace"])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, target):
    path, old = _crash_case(tmp_path, monkeypatch, target, OSError(28, "No space left on device"))
    with pytest.raises(CheckpointError) as e:
        save(path, _tensors(1), {"step": 2})
    _assert_one_line(e.value, "cannot write checkpoint", "No space left on device")
    monkeypatch.undo()
    got, meta = load(path)
    assert meta["step"] == 1
    np.testing.assert_array_equal(got["decoder.bias"], old["decoder.bias"])
    assert os.listdir(tmp_path) == ["latest.safetensors"]  # no temp file left


def test_interrupt_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path, _ = _crash_case(tmp_path, monkeypatch, "fsync", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save(path, _tensors(1), {"step": 2})
    monkeypatch.undo()
    assert load(path)[1]["step"] == 1
    assert os.listdir(tmp_path) == ["latest.safetensors"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path):
    # A real SIGKILL after the temp file is written but before the rename: nothing in the
    # process can clean up, and the previous checkpoint must still be there, whole.
    path = tmp_path / "latest.safetensors"
    save(path, _tensors(0), {"step": 1})
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from charrnn import checkpoint
        checkpoint.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save({str(path)!r}, {{"w": np.ones((256, 256), np.float32)}}, {{"step": 2}})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint.__file__)))
    paths = [root, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    got, meta = load(path)
    assert meta["step"] == 1 and "w" not in got
    # The orphaned temp file is hidden and does not stop the next save.
    save(path, _tensors(2), {"step": 3})
    assert read_meta(path)["step"] == 3


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    for fn in (load, read_meta):
        with pytest.raises(CheckpointError) as e:
            fn(path)
        _assert_one_line(e.value, f"no checkpoint at {path}", "charrnn train CORPUS", "-c FILE")


def test_directory(tmp_path):
    for fn in (load, read_meta):
        with pytest.raises(CheckpointError) as e:
            fn(tmp_path)
        _assert_one_line(e.value, f"{tmp_path} is a directory", "best.safetensors")


def _unreadable_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save(good, _tensors(), _meta())
    blob = good.read_bytes()
    header_len = struct.unpack("<Q", blob[:8])[0]
    yield "truncated", blob[: len(blob) // 2]
    yield "cut in the data", blob[:-1]
    yield "trailing bytes", blob + b"\0\0"
    yield "cut in the header", blob[: 8 + header_len // 2]
    yield "garbage", bytes(range(256)) * 4
    yield "empty", b""
    yield "text", b"hello, this is a text file\n" * 10
    yield "header beyond file", struct.pack("<Q", 10_000) + b'{"a": 1}'
    yield "header not utf-8", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"
    yield "header a list", struct.pack("<Q", 2) + b"[]"


def test_unreadable_files(tmp_path):
    for label, blob in list(_unreadable_files(tmp_path)):
        path = tmp_path / "bad.safetensors"
        path.write_bytes(blob)
        for fn in (load, read_meta):
            with pytest.raises(CheckpointError) as e:
                fn(path)
            _assert_one_line(e.value, f"{path} is not a readable checkpoint",
                             "truncated or not a safetensors file")


def test_damaged_files_only_raise_checkpoint_error(tmp_path):
    # Seeded byte flips, cuts and insertions: whatever the damage, never a raw traceback.
    good = tmp_path / "good.safetensors"
    save(good, _tensors(), _meta())
    blob = good.read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "bad.safetensors"
    for i in range(300):
        b = bytearray(blob)
        if i % 3 == 0:
            b[rng.integers(len(b))] = rng.integers(256)
        elif i % 3 == 1:
            b = b[: rng.integers(len(b))]
        else:
            at = int(rng.integers(8, 200))
            b[at:at] = bytes(rng.integers(0, 256, 3, dtype=np.uint8))
        path.write_bytes(bytes(b))
        for fn in (load, read_meta):
            try:
                fn(path)
            except CheckpointError as e:
                assert "\n" not in str(e) and "hint:" in str(e)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    blob = safetensors.numpy.save({"w": np.zeros(3, np.float32)}, metadata={"format": "pt"})
    path.write_bytes(blob)
    for fn in (load, read_meta):
        with pytest.raises(CheckpointError) as e:
            fn(path)
        _assert_one_line(e.value, "is a safetensors file but not a charrnn checkpoint",
                         "no 'charrnn' metadata")


def _write_raw_meta(path, text: str) -> None:
    blob = safetensors.numpy.save({"w": np.zeros(3, np.float32)}, metadata={"charrnn": text})
    path.write_bytes(blob)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"step": 1}', '{"format_version": "1"}',
                                  '{"format_version": 0}', '{"format_version": true}'])
def test_corrupt_metadata(tmp_path, text):
    path = tmp_path / "ck.safetensors"
    _write_raw_meta(path, text)
    for fn in (load, read_meta):
        with pytest.raises(CheckpointError) as e:
            fn(path)
        _assert_one_line(e.value, "corrupt charrnn metadata")


def test_newer_format_version(tmp_path):
    path = tmp_path / "ck.safetensors"
    _write_raw_meta(path, json.dumps({"format_version": FORMAT_VERSION + 1}))
    for fn in (load, read_meta):
        with pytest.raises(CheckpointError) as e:
            fn(path)
        assert str(e.value) == (
            f"{path} was written by a newer charrnn (format {FORMAT_VERSION + 1}, this version "
            f"reads {FORMAT_VERSION}); hint: upgrade charrnn (pip install -U charrnn)")


def test_bad_tensors_rejected_before_writing(tmp_path):
    path = tmp_path / "ck.safetensors"
    with pytest.raises(TypeError, match="not a numpy array"):
        save(path, {"w": [1.0, 2.0]}, {})
    with pytest.raises(TypeError, match="dtype object"):
        save(path, {"w": np.array([object()])}, {})
    assert not path.exists()


def test_a_file_that_is_not_a_checkpoint_at_all_is_not_called_damaged(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# a readme\n" * 20)
    with pytest.raises(CheckpointError) as e:
        load(path)
    _assert_one_line(e.value, f"{path} is not a readable checkpoint",
                     "pass a checkpoint written by `charrnn train`")
    assert "other checkpoint" not in str(e.value)


def test_a_failed_atomic_write_names_the_file_asked_for_not_its_temp():
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc, where no file can be created")
    with pytest.raises(OSError) as e:
        checkpoint.write_atomic("/proc/chart.svg", b"<svg/>")
    assert e.value.filename == "/proc/chart.svg" and ".tmp-" not in str(e.value)
