"""Checkpoints: safetensors tensors plus one JSON metadata document, written atomically.

A checkpoint is a plain safetensors file. Its header metadata holds a single key,
"charrnn", whose value is one JSON document (configs, vocabulary, optimizer step, RNG
state, data position, ...) with "format_version" added by `save`. Tensors whose name starts
with "train." are training state (optimizer moments); everything else is the model.

Loading never unpickles, so opening a checkpoint cannot run code. Every way a file can be
wrong (missing, a directory, truncated, foreign, written by a newer charrnn) raises
`CheckpointError` with a one-line message that ends in a hint saying what to do.

Writes go to a hidden temp file in the same directory, are fsynced, and then renamed over
the target, so a crash or kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

FORMAT_VERSION = 1
META_KEY = "charrnn"
TRAIN_PREFIX = "train."  # tensors kept at full precision by save(half=True)

# safetensors' own parser refuses headers above 100 MB; a larger length means garbage.
_MAX_HEADER = 100_000_000
_STORABLE = {np.dtype(t) for t in (
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
    np.int64, np.uint64, np.float16, np.float32, np.float64,
)}

_HINT_MISSING = "hint: train one with `charrnn train CORPUS` or pass -c FILE"
_HINT_DIR = ("hint: pass a .safetensors file (a run directory holds best.safetensors "
             "and latest.safetensors)")
_HINT_UNREADABLE = ("hint: the file was cut short or is not a checkpoint; use the run's other "
                    "checkpoint (best.safetensors or latest.safetensors) or train again")
_HINT_FOREIGN = "hint: pass a checkpoint written by `charrnn train`"
_HINT_CORRUPT = ("hint: the metadata was damaged or edited by hand; use the run's other "
                 "checkpoint or train again")


class CheckpointError(Exception):
    """A checkpoint cannot be read or written; str(e) is one line ending in a hint."""


# ---------------------------------------------------------------- saving


def _json_default(obj):
    # numpy scalars and arrays sneak into metadata (losses, RNG keys); store them as Python.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _prepare(tensors: dict, half: bool) -> dict[str, np.ndarray]:
    out = {}
    for name, a in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor name {name!r} is not a string; "
                            "hint: name tensors with str keys")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"tensor {name!r} is a {type(a).__name__}, not a numpy array; "
                            "hint: copy it to the host first (backend.to_numpy)")
        if a.dtype not in _STORABLE:
            raise TypeError(f"tensor {name!r} has dtype {a.dtype}, which a checkpoint cannot "
                            "store; hint: convert it to a float or integer dtype")
        if half and a.dtype == np.float32 and not name.startswith(TRAIN_PREFIX):
            a = a.astype(np.float16)
        out[name] = np.ascontiguousarray(a)
    return out


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable. Windows cannot open a directory, and some
    # filesystems refuse fsync on one; the data file is already synced either way.
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path, tensors: dict[str, np.ndarray], meta: dict, half: bool = False) -> None:
    """Write `tensors` and `meta` (plus "format_version") to `path` atomically.

    half=True stores float32 tensors not named "train.*" as float16 (shipped models); load
    turns them back into float32. Metadata must be JSON-serialisable; numpy scalars and
    arrays are stored as Python numbers and lists, Python ints of any size round-trip.
    """
    path = os.fspath(path)
    doc = dict(meta)  # a copy: the caller's dict is not touched
    doc["format_version"] = FORMAT_VERSION
    try:
        text = json.dumps(doc, default=_json_default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata for {path} is not JSON-serialisable ({e}); "
                              "hint: store only numbers, strings, lists and dicts in meta"
                              ) from None
    blob = safetensors.numpy.save(_prepare(tensors, half), metadata={META_KEY: text})
    try:
        write_atomic(path, blob)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); hint: check that "
                              "the directory is writable and the disk has free space") from e


def write_atomic(path, data: bytes) -> None:
    """Replace `path` with `data` in one step (temp file, fsync, rename): a crash leaves the
    old file or the new one, never a mix. Checkpoints, metrics and charts go through here."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Any failure, including KeyboardInterrupt, must not leave the temp file behind.
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename == tmp:  # name the file the user asked for
            raise OSError(e.errno, e.strerror, path) from None
        raise
    _fsync_dir(directory)


# ---------------------------------------------------------------- loading


def _open_error(path: str, e: OSError) -> CheckpointError:
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"no checkpoint at {path}; {_HINT_MISSING}")
    if isinstance(e, IsADirectoryError) or os.path.isdir(path):
        return CheckpointError(f"{path} is a directory; {_HINT_DIR}")
    reason = e.strerror or type(e).__name__
    return CheckpointError(f"cannot read {path} ({reason}); hint: check the file's permissions")


def _unreadable(path: str) -> CheckpointError:
    if not str(path).endswith(".safetensors"):  # README.md, a corpus: not a damaged checkpoint
        return CheckpointError(f"{path} is not a readable checkpoint (truncated or not a "
                               f"safetensors file); {_HINT_FOREIGN}")
    return CheckpointError(f"{path} is not a readable checkpoint (truncated or not a "
                           f"safetensors file); {_HINT_UNREADABLE}")


def _check_path(path: str) -> None:
    # open() on a directory raises PermissionError on Windows, so ask first.
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; {_HINT_DIR}")


def _parse_header(path: str, header: bytes, file_size: int) -> dict:
    """Validate a safetensors JSON header against the file size; return our metadata."""
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _unreadable(path) from None
    if not isinstance(doc, dict):
        raise _unreadable(path)
    # The data section must be exactly the tensors' bytes (safetensors' own rule): this
    # catches truncation without reading the tensors themselves.
    end = 0
    for key, spec in doc.items():
        if key == "__metadata__":
            continue
        try:
            _begin, stop = spec["data_offsets"]
            end = max(end, int(stop))
        except (TypeError, KeyError, ValueError):
            raise _unreadable(path) from None
    if 8 + len(header) + end != file_size:
        raise _unreadable(path)
    extra = doc.get("__metadata__") or {}
    if not isinstance(extra, dict) or META_KEY not in extra:
        raise CheckpointError(f"{path} is a safetensors file but not a charrnn checkpoint "
                              f"(no '{META_KEY}' metadata); {_HINT_FOREIGN}")
    try:
        meta = json.loads(extra[META_KEY])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path} has corrupt charrnn metadata (not valid JSON); "
                              f"{_HINT_CORRUPT}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has corrupt charrnn metadata (not a JSON object); "
                              f"{_HINT_CORRUPT}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has corrupt charrnn metadata (format_version is "
                              f"{version!r}, expected an integer >= 1); {_HINT_CORRUPT}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer charrnn (format {version}, this "
                              f"version reads {FORMAT_VERSION}); hint: upgrade charrnn "
                              "(pip install -U charrnn)")
    return meta


def _header_length(path: str, head: bytes, file_size: int) -> int:
    if len(head) < 8:
        raise _unreadable(path)
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > _MAX_HEADER or 8 + n > file_size:
        raise _unreadable(path)
    return n


def read_meta(path) -> dict:
    """The metadata of a checkpoint, reading only its header (not the tensors)."""
    path = os.fspath(path)
    _check_path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = _header_length(path, f.read(8), size)
            header = f.read(n)
    except OSError as e:
        raise _open_error(path, e) from None
    return _parse_header(path, header, size)


def load(path, keep_half: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint: (tensors, meta). float16 tensors come back as float32, or as
    stored with keep_half=True."""
    path = os.fspath(path)
    _check_path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _open_error(path, e) from None
    n = _header_length(path, data[:8], len(data))
    meta = _parse_header(path, data[8 : 8 + n], len(data))
    try:
        tensors = safetensors.numpy.load(data)
    except (SafetensorError, ValueError, TypeError):  # numpy's, on a damaged layout
        raise _unreadable(path) from None
    for name, a in tensors.items():
        if a.dtype == np.float16 and not keep_half:
            tensors[name] = a.astype(np.float32)
    return tensors, meta


__all__ = ["FORMAT_VERSION", "CheckpointError", "load", "read_meta", "save"]
