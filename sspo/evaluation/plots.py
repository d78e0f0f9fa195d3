"""Training curves from run folders: reward during training (Figure 9) and SSR rate (Figure 4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sspo.io import atomic_path, read_jsonl

Series = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # label -> (steps, mean, 95% CI half-width over runs)


def mean_curve(runs: Sequence[Path], file: str, key: str, window: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``key`` against step, averaged over runs (seeds) and smoothed by a trailing ``window``, with
    the 95% CI half-width over runs (zero for one run)."""
    from sspo.evaluation.scorers.stats import t_quantile

    curves = []
    for run in runs:
        rows = [r for r in read_jsonl(run / file) if key in r]
        if rows:
            curves.append(({r["step"] for r in rows}, {r["step"]: r[key] for r in rows}))
    if not curves:
        return None
    steps = sorted(set.intersection(*(s for s, _ in curves)))
    values = np.array([[c[s] for s in steps] for _, c in curves], dtype=float)
    if window > 1:
        values = np.array([[row[max(0, i - window + 1) : i + 1].mean() for i in range(len(row))] for row in values])
    half = np.zeros(len(steps))
    if len(values) > 1:
        half = t_quantile(0.975, len(values) - 1) * values.std(axis=0, ddof=1) / np.sqrt(len(values))
    return np.array(steps), values.mean(axis=0), half


def reward_series(runs: dict[str, Sequence[Path]], splits: Sequence[str] = ("heldout", "seen")) -> Series:
    series = {}
    for name, dirs in runs.items():
        for split in splits:
            curve = mean_curve(dirs, "validation.jsonl", f"reward_{split}")
            if curve is not None:
                series[f"{name} ({split})"] = curve
    return series


def ssr_series(runs: dict[str, Sequence[Path]], window: int = 10) -> Series:
    series = {}
    for name, dirs in runs.items():
        curve = mean_curve(dirs, "metrics.jsonl", "ssr_rate", window)
        if curve is not None:
            series[name] = curve
    return series


def plot_panels(panels: Sequence[tuple[str, str, Series]], path: str | Path) -> None:
    """One PNG with a panel per (title, y label, series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        for label, (steps, values, half) in series.items():
            line = ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)[0]
            if half.any():
                ax.fill_between(steps, values - half, values + half, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


REWARD_PANEL = ("reward during training", "exact reward")
SSR_PANEL = ("SSR rate (share of samples whose switch fired)", "SSR rate")
