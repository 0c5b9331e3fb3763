"""Loss curves as SVG: training and validation loss against step, from runs' metrics.jsonl.

No plotting library: an SVG line chart is a page of text, and GitHub renders it in a README.
Each run contributes a training curve (the logged means, thin) and a validation curve
(the evaluations, thick, with markers); runs are told apart by colour.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

# Colour-blind-safe (Okabe-Ito), one per run, in order.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
WIDTH, HEIGHT = 760, 420
MARGIN = {"left": 64, "right": 24, "top": 40, "bottom": 52}
CHAR_W, LEGEND_KEY = 7.0, 30  # px: a legend character; the line sample and its gap


@dataclass
class Curves:
    label: str
    train: list[tuple[int, float]]  # (step, mean training loss since the previous log)
    val: list[tuple[int, float]]  # (step, validation loss)


def read_run(run_dir: Path, label: str | None = None) -> Curves:
    """The curves of one run directory (its metrics.jsonl)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl; pass a run directory made by "
                         "`charrnn train`")
    train, val = [], []
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes fail as bad JSON below
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
            step = rec.get("step") if isinstance(rec, dict) else None
            if not isinstance(step, int):
                continue
            if _finite(rec.get("train_loss")):
                train.append((step, float(rec["train_loss"])))
            if _finite(rec.get("val_loss")):
                val.append((step, float(rec["val_loss"])))
    if not train and not val:
        raise ValueError(f"{path} records no losses yet")
    # A resumed run may log a step again: keep the last record of each step.
    dedup = lambda pts: sorted(dict(pts).items())
    return Curves(label or Path(run_dir).name, dedup(train), dedup(val))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:g}"


def loss_svg(runs: list[Curves], title: str = "", target: float | None = None,
             y_max: float | None = None) -> str:
    """An SVG line chart of the runs' curves. target: a dashed horizontal line (a goal);
    y_max: clip the loss axis (the first steps' losses dwarf the rest)."""
    if not runs:
        raise ValueError("no runs to plot")
    pts = [p for r in runs for p in r.train + r.val]
    x_hi = max(s for s, _ in pts)
    ys = [v for _, v in pts] + ([target] if target is not None else [])
    y_lo, y_hi = min(ys), max(ys)
    if y_max is not None:
        if y_max <= y_lo:
            raise ValueError(f"--y-max {y_max} is below every loss (lowest {y_lo:.4f})")
        y_hi = min(y_hi, y_max)
    if not math.isfinite(y_hi - y_lo):
        raise ValueError(f"the losses span too wide a range to draw ({y_lo:g} to {y_hi:g}); clip it "
                         "with --y-max")
    yt = nice_ticks(y_lo, y_hi)
    # The step axis ends at the last step (a round end tick could add half a chart of
    # nothing); the loss axis at round values around the data.
    xt = [t for t in nice_ticks(0, x_hi) if t <= x_hi]
    x0, x1, y0, y1 = 0.0, float(max(x_hi, 1)), yt[0], yt[-1]
    L, R, T, B = MARGIN["left"], WIDTH - MARGIN["right"], MARGIN["top"], HEIGHT - MARGIN["bottom"]
    sx = lambda s: L + (s - x0) / (x1 - x0) * (R - L)
    sy = lambda v: B - (v - y0) / (y1 - y0) * (B - T)  # above y1 (--y-max): clipped away

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">'),
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<clipPath id="frame"><rect x="{L}" y="{T}" width="{R - L}" height="{B - T}"/></clipPath>']
    if title:
        out.append(f'<text x="{WIDTH / 2:.1f}" y="22" text-anchor="middle" font-size="15">'
                   f'{escape(title)}</text>')
    for v in yt:  # horizontal grid and loss labels
        out.append(f'<line x1="{L}" x2="{R}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{L - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    for s in xt:  # step labels
        out.append(f'<line x1="{sx(s):.1f}" x2="{sx(s):.1f}" y1="{B}" y2="{B + 4}" stroke="#444"/>')
        out.append(f'<text x="{sx(s):.1f}" y="{B + 18}" text-anchor="middle">{_fmt(s)}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{R - L}" height="{B - T}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{(L + R) / 2:.1f}" y="{HEIGHT - 12}" text-anchor="middle">step</text>')
    out.append(f'<text transform="translate(16 {(T + B) / 2:.1f}) rotate(-90)" '
               'text-anchor="middle">loss (nats/char)</text>')
    if target is not None and y0 <= target <= y1:
        out.append(f'<line x1="{L}" x2="{R}" y1="{sy(target):.1f}" y2="{sy(target):.1f}" '
                   'stroke="#444" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{R - 4}" y="{sy(target) - 5:.1f}" text-anchor="end">'
                   f'target {target:g}</text>')
    legend = []
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        for kind, pts_, width in (("train", run.train, 1.2), ("val", run.val, 2.4)):
            if not pts_:
                continue
            path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts_)
            faint = ' stroke-opacity="0.55"' if kind == "train" else ""
            out.append(f'<polyline class="{kind}" clip-path="url(#frame)" fill="none" '
                       f'stroke="{colour}" stroke-width="{width}"{faint} points="{path}"/>')
            if kind == "val":
                out += [f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{colour}"/>'
                        for s, v in pts_ if v <= y1]
            best = f" (best {min(v for _, v in pts_):.4f})" if kind == "val" else ""
            legend.append((colour, width, f"{run.label} {kind}{best}"))
    # top-right, inside the frame, as wide as its longest entry (SVG cannot measure text:
    # CHAR_W is a generous average glyph width of 12px sans-serif)
    x_key = max(L + 8, R - 10 - LEGEND_KEY - CHAR_W * max((len(t) for *_, t in legend), default=0))
    for j, (colour, width, text) in enumerate(legend):
        y = T + 16 + 16 * j
        out.append(f'<line x1="{x_key:.1f}" x2="{x_key + 24:.1f}" y1="{y - 4}" y2="{y - 4}" '
                   f'stroke="{colour}" stroke-width="{width}"/>')
        out.append(f'<text x="{x_key + LEGEND_KEY:.1f}" y="{y}">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


__all__ = ["Curves", "loss_svg", "nice_ticks", "read_run"]
