"""The early-stopping plot: training loss, L_det and the DVAR ratio r against steps, stop step marked.

Drawn with Pillow (which diffusers has already imported) rather than matplotlib: importing matplotlib and
laying out its figure cost ~0.5 s at the end of every run, a tenth of a toy run's training. Three panels of
line charts need no more than lines, a dash, and the axis ranges as text.
"""
from __future__ import annotations

import os
from pathlib import Path

PLOT = "dvar.png"
WIDTH, PANEL_HEIGHT, MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 700, 230, 70, 20, 28, 22
BLUE, LIGHT_BLUE, ORANGE, GREEN, GRAY, RED = ((31, 119, 180), (170, 200, 225), (255, 127, 14), (44, 160, 44),
                                              (128, 128, 128), (214, 39, 40))


def _smooth(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


class _Panel:
    """One chart: data coordinates (steps on x, values on y) mapped into the box top..top+PANEL_HEIGHT."""

    def __init__(self, draw, top: int, x_max: int, values: list[float], label: str, font):
        self.draw, self.top, self.x_max = draw, top, max(1, x_max)
        finite = [v for v in values if v == v and abs(v) != float("inf")] or [0.0, 1.0]
        low, high = min(finite), max(finite)
        pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
        self.low, self.high = (max(0.0, low - pad) if low >= 0 else low - pad), high + pad  # a loss stays >= 0
        self.left, self.right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
        self.bottom = top + PANEL_HEIGHT - MARGIN_BOTTOM
        self.box_top = top + MARGIN_TOP
        draw.rectangle([self.left, self.box_top, self.right, self.bottom], outline=(0, 0, 0))
        draw.text((4, self.box_top), f"{self.high:.3g}", fill=(0, 0, 0), font=font)
        draw.text((4, self.bottom - 12), f"{self.low:.3g}", fill=(0, 0, 0), font=font)
        draw.text((4, (self.box_top + self.bottom) // 2 - 6), label, fill=(0, 0, 0), font=font)

    def xy(self, step: float, value: float) -> tuple[float, float]:
        x = self.left + (self.right - self.left) * step / self.x_max
        y = self.bottom - (self.bottom - self.box_top) * (value - self.low) / (self.high - self.low)
        return x, y

    def line(self, points: list[tuple[float, float]], color, width: int = 1) -> None:
        if len(points) == 1:
            points = points * 2
        if points:
            self.draw.line([self.xy(s, v) for s, v in points], fill=color, width=width)

    def hline(self, value: float, color, dash: int = 6) -> None:
        _, y = self.xy(0, value)
        for x in range(self.left, self.right, 2 * dash):
            self.draw.line([(x, y), (min(x + dash, self.right), y)], fill=color)

    def vline(self, step: float, color) -> None:
        x, _ = self.xy(step, self.low)
        self.draw.line([(x, self.box_top), (x, self.bottom)], fill=color, width=2)


def plot_early_stop(path: str | os.PathLike, losses: list[float], l_det: list[tuple[int, float]],
                    ratios: list[tuple[int, float]], threshold: float | None, stop_step: int | None,
                    title: str = "") -> Path:
    """Write a 3-panel PNG. losses[s] is the training loss of step s+1; l_det and ratios are (step, value)
    pairs (step = updates done when the probe ran); stop_step is None when the run went to its cap."""
    from PIL import Image, ImageDraw

    path = Path(path)
    font, small = _font(12), _font(10)
    image = Image.new("RGB", (WIDTH, 3 * PANEL_HEIGHT + 20), "white")
    draw = ImageDraw.Draw(image)
    pts = [(s, r) for s, r in ratios if r is not None]
    x_max = max([len(losses)] + [s for s, _ in l_det] + [s for s, _ in pts] + [stop_step or 0])
    heading = f"{title}  stopped at step {stop_step}".strip() if stop_step is not None else title
    draw.text((MARGIN_LEFT, 6), heading, fill=(0, 0, 0), font=font)

    steps = list(range(1, len(losses) + 1))
    loss = _Panel(draw, 0, x_max, losses, "loss", small)
    loss.line(list(zip(steps, losses)), LIGHT_BLUE)
    loss.line(list(zip(steps, _smooth(losses, max(1, len(losses) // 50)))), BLUE, 2)
    draw.text((loss.right - 190, loss.box_top + 4), "training loss (light), smoothed", fill=BLUE, font=small)

    det = _Panel(draw, PANEL_HEIGHT, x_max, [v for _, v in l_det], "L_det", small)
    det.line(list(l_det), ORANGE, 2)
    draw.text((det.right - 120, det.box_top + 4), "L_det (fixed batch)", fill=ORANGE, font=small)

    ratio = _Panel(draw, 2 * PANEL_HEIGHT, x_max, [r for _, r in pts] + ([threshold] if threshold is not None else []),
                   "r", small)
    ratio.line(pts, GREEN, 2)
    legend = "r = var(window) / var(all)"
    if threshold is not None:
        ratio.hline(threshold, GRAY)
        legend += f", alpha = {threshold:g} (dashed)"
    draw.text((ratio.right - 300, ratio.box_top + 4), legend, fill=GREEN, font=small)
    draw.text((ratio.left, ratio.bottom + 4), "0", fill=(0, 0, 0), font=small)
    draw.text((ratio.right - 60, ratio.bottom + 4), f"step {x_max}", fill=(0, 0, 0), font=small)
    if stop_step is not None:
        for panel in (loss, det, ratio):
            panel.vline(stop_step, RED)
    tmp = path.with_name(path.stem + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
    return path
