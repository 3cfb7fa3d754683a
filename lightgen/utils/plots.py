"""Line plots as PNG with Pillow alone (no matplotlib dependency): loss and metric curves."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average (TensorBoard-style smoothing)."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _label(value: float, lo: float, hi: float, n: int = 5) -> str:
    """A tick label with one decimal more than the tick spacing ``(hi - lo) / (n - 1)`` needs."""
    step = (hi - lo) / (n - 1)
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.3g}"
    decimals = max(0, 1 - math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{min(decimals, 4)}f}"


def plot_curves(
    series: dict[str, tuple[list[float], list[float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    size: tuple[int, int] = (720, 420),
    logx: bool = False,
) -> Path:
    """Draw named (x, y) series on shared axes and save a PNG; ``logx`` puts x on a log axis, ticked at the data."""
    if logx:
        if any(x <= 0 for xv, _ in series.values() for x in xv):
            raise ValueError("plot_curves(logx=True) needs positive x values.")
        marks = sorted({x for xv, _ in series.values() for x in xv})
        series = {k: ([math.log10(x) for x in xv], yv) for k, (xv, yv) in series.items()}
    w, h = size
    left, right, top, bottom = 70, 20, 36, 48
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv]
    if not xs:
        raise ValueError("plot_curves needs at least one non-empty series.")
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([left - 4, yy, left, yy], fill="black")
        d.line([left, yy, w - right, yy], fill=(230, 230, 230))
        d.text((4, yy - 6), _label(t, y0, y1), fill="black")
    xticks = [(math.log10(m), f"{m:g}") for m in marks] if logx else [(t, _label(t, x0, x1)) for t in _ticks(x0, x1)]
    for t, text in xticks:
        xx, _ = px(t, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 12, h - bottom + 8), text, fill="black")
    d.text((w // 2 - 20, h - 18), xlabel + (" (log scale)" if logx else ""), fill="black")
    d.text((4, 4), f"{title}   {ylabel}".strip(), fill="black")
    for i, (name, (xv, yv)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = [px(x, y) for x, y in zip(xv, yv)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        if len(pts) <= 40:  # measurements (a sweep), not a curve: mark each point
            for xx, yy in pts:
                d.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=color)
        d.text((w - right - 200, top + 6 + 14 * i), f"- {name}", fill=color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
