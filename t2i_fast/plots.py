"""The early-stopping plot: training loss, L_det and the DVAR ratio r against steps, stop step marked."""
from __future__ import annotations

import os
from pathlib import Path

PLOT = "dvar.png"


def _smooth(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plot_early_stop(path: str | os.PathLike, losses: list[float], l_det: list[tuple[int, float]],
                    ratios: list[tuple[int, float]], threshold: float | None, stop_step: int | None,
                    title: str = "") -> Path:
    """Write a 3-panel PNG. losses[s] is the training loss of step s+1; l_det and ratios are (step, value)
    pairs (step = updates done when the probe ran); stop_step is None when the run went to its cap."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    steps = list(range(1, len(losses) + 1))
    ax = axes[0]
    if losses:
        ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue", label="training loss")
        ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), lw=1.2, color="tab:blue", label="smoothed")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    if l_det:
        ax.plot([s for s, _ in l_det], [v for _, v in l_det], ".-", ms=2, lw=1, color="tab:orange")
    ax.set_ylabel("L_det (fixed batch)")
    ax = axes[2]
    pts = [(s, r) for s, r in ratios if r is not None]
    if pts:
        ax.plot([s for s, _ in pts], [r for _, r in pts], lw=1, color="tab:green", label="r")
    if threshold is not None:
        ax.axhline(threshold, ls="--", lw=1, color="gray", label=f"alpha = {threshold:g}")
    ax.set_ylabel("r = var(window) / var(all)")
    ax.set_xlabel("step")
    ax.legend(loc="upper right", fontsize=8)
    if stop_step is not None:
        for a in axes:
            a.axvline(stop_step, color="tab:red", lw=1.2)
        axes[0].set_title(f"{title}  stopped at step {stop_step}".strip(), fontsize=10)
    elif title:
        axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
