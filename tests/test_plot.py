"""Loss-curve charts: metrics.jsonl parsing, tick choice, the SVG drawn, and `charrnn plot`."""

import itertools
import json
import math
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from charrnn.cli import main
from charrnn.plot import CHAR_W, HEIGHT, MARGIN, WIDTH, loss_svg, nice_ticks, read_run

SVG = "{http://www.w3.org/2000/svg}"


def _write_run(d, records):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return d


def _records(n=20, val_every=5, offset=0.0):
    return [{"step": s, "train_loss": 1.2 + 3 * math.exp(-s / 4) + offset,
             "val_loss": 1.5 + 2 * math.exp(-s / 4) + offset if s % val_every == 0 else None}
            for s in range(1, n + 1)]


def _points(poly):
    return [tuple(map(float, p.split(","))) for p in poly.get("points").split()]


def test_read_run_keeps_losses_and_skips_the_rest(tmp_path):
    recs = _records()
    recs.insert(3, {"kind": "rollback", "step": 3, "loss": float("nan")})  # no train/val loss
    recs.append({"step": 21, "train_loss": float("inf"), "val_loss": None})  # not finite
    recs.append({"step": 20, "train_loss": 9.0, "val_loss": 8.0})  # a resumed run logs step 20 again
    c = read_run(_write_run(tmp_path / "r", recs))
    assert c.label == "r"
    assert [s for s, _ in c.train] == list(range(1, 21))
    assert [s for s, _ in c.val] == [5, 10, 15, 20]
    assert c.train[-1] == (20, 9.0) and c.val[-1] == (20, 8.0)  # the last record of a step wins


@pytest.mark.parametrize("content, message", [
    (None, "has no metrics.jsonl"),
    ("not json\n", "not a JSON line"),
    ('{"kind": "start", "step": 0}\n', "records no losses yet"),
])
def test_read_run_errors(tmp_path, content, message):
    d = tmp_path / "r"
    d.mkdir()
    if content is not None:
        (d / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_run(d)


@pytest.mark.parametrize("lo, hi", [(0, 2000), (1.234, 4.17), (0, 7), (1.39, 1.41), (0, 1), (5, 5)])
def test_nice_ticks_cover_the_range_in_round_steps(lo, hi):
    t = nice_ticks(lo, hi)
    assert t[0] <= lo and t[-1] >= hi
    steps = {round(b - a, 9) for a, b in itertools.pairwise(t)}
    assert len(steps) == 1  # evenly spaced
    step = steps.pop()
    mant = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mant, m) for m in (1, 2, 5))
    assert 3 <= len(t) <= 12


def test_svg_draws_every_curve_inside_the_frame(tmp_path):
    a = read_run(_write_run(tmp_path / "a", _records()))
    b = read_run(_write_run(tmp_path / "b", _records(offset=0.1)))
    root = ET.fromstring(loss_svg([a, b], title="two runs", target=1.4))
    polys = root.findall(f"{SVG}polyline")
    assert [p.get("class") for p in polys] == ["train", "val", "train", "val"]
    assert polys[0].get("stroke") != polys[2].get("stroke")  # runs differ by colour
    assert len(_points(polys[1])) == 4  # one vertex per evaluation
    for p in polys:
        for x, y in _points(p):
            assert MARGIN["left"] - 1e-6 <= x <= WIDTH - MARGIN["right"] + 1e-6
            assert MARGIN["top"] - 1e-6 <= y <= HEIGHT - MARGIN["bottom"] + 1e-6
    # Loss falls over the run: later points sit lower on the chart (larger y).
    (x0, y_first), (x1, y_last) = _points(polys[0])[0], _points(polys[0])[-1]
    assert x1 > x0 and y_last > y_first
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "two runs" in texts and "target 1.4" in texts
    assert any(t.startswith("a val (best ") for t in texts)


@pytest.mark.parametrize("label", ["a", "checkpoints/runs/shakespeare-3x512-residual-stage2"])
def test_the_legend_fits_inside_the_frame(tmp_path, label):
    c = read_run(_write_run(tmp_path / "a", _records()), label=label)
    root = ET.fromstring(loss_svg([c]))
    entry = next(t for t in root.iter(f"{SVG}text") if t.text.startswith(f"{label} val (best "))
    x = float(entry.get("x"))
    assert MARGIN["left"] < x and x + CHAR_W * len(entry.text) <= WIDTH - MARGIN["right"]


def test_y_max_clips_the_axis_and_rejects_a_limit_below_every_loss(tmp_path):
    c = read_run(_write_run(tmp_path / "a", _records()))
    root = ET.fromstring(loss_svg([c], y_max=2.0))
    labels = [float(t.text) for t in root.iter(f"{SVG}text")
              if t.get("text-anchor") == "end" and t.text.replace(".", "").isdigit()]
    assert max(labels) <= 2.0 + 1e-9
    with pytest.raises(ValueError, match="below every loss"):
        loss_svg([c], y_max=0.5)


def test_plot_command_writes_the_chart_and_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _write_run(tmp_path / "run1", _records())
    res = CliRunner().invoke(main, ["plot", str(run), "-o", "curve.svg", "--title", "t",
                                    "--label", "mine"])
    assert res.exit_code == 0, res.output
    root = ET.parse(tmp_path / "curve.svg").getroot()
    assert any((t.text or "").startswith("mine val") for t in root.iter(f"{SVG}text"))
    assert not list(tmp_path.glob("*.tmp"))
    for args, message in ((["plot", str(tmp_path / "nope")], "has no metrics.jsonl"),
                          (["plot", str(run), "--label", "a", "--label", "b"], "--label given 2 times")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1
        assert message in res.output and "Traceback" not in res.output
