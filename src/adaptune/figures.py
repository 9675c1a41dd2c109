"""Every figure adaptune draws, in one place and one style: the importance heatmap, freeze
plans, confusion matrices, the leaderboard and the quality/cost trade-offs.

Figures are drawn with matplotlib's object API (``Figure``), so no global pyplot state or
display backend is involved, and saved as PNG at 130 dpi.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from adaptune.plans import Plan


def percent(fraction: float) -> str:
    """0.0000847 -> '0.00847%', 1.0 -> '100%': three significant digits at any scale; '–'
    where it does not apply (a baseline that fine-tunes nothing)."""
    if fraction is None or pd.isna(fraction):
        return "–"
    return f"{100 * fraction:.3g}%"


def plot_heatmap(
    layers: pd.DataFrame, metrics: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Metric x layer heatmap of per-element scores (``<metric>_per_element`` of each of
    ``metrics``) relative to each metric's largest *pretrained* layer.

    The new head is not part of the scale (its gradient is often orders of magnitude above the
    body's and would push every body cell to the floor): its cells say how many times the top
    body layer it is. The colour scale is logarithmic (1 down to 1e-3). A negative score (a
    Hutchinson trace estimate below zero) is drawn in red and marked "neg", not clipped to the
    floor; a trace estimate within two standard errors of zero is marked "?" (noise).
    """
    if "layer_kind" in layers.columns:
        head = (layers["layer_kind"] == "head").to_numpy()
    else:
        head = (layers["layer"] == "head").to_numpy()
    body = ~head if (~head).any() else np.ones_like(head)
    relative = np.vstack(
        [
            layers[f"{m}_per_element"].to_numpy(float)
            / max(layers[f"{m}_per_element"].to_numpy(float)[body].max(), 1e-300)
            for m in metrics
        ]
    )
    noisy = np.zeros_like(relative, dtype=bool)
    if "hessian_trace" in metrics and "hessian_trace_se" in layers.columns:
        trace = layers["hessian_trace"].to_numpy(float)
        noisy[list(metrics).index("hessian_trace")] = np.abs(trace) < 2 * layers[
            "hessian_trace_se"
        ].to_numpy(float)
    floor = 1e-3
    width = max(6.0, 0.6 * len(layers) + 2.5)
    fig = Figure(figsize=(width, 0.55 * len(metrics) + 2.4))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightcoral")
    shown = np.ma.masked_less(relative, 0)
    image = ax.imshow(np.ma.clip(shown, floor, 1), aspect="auto", cmap=cmap, norm=LogNorm(floor, 1))
    ax.set_xticks(range(len(layers)), layers["layer"], rotation=45, ha="right")
    ax.set_yticks(range(len(metrics)), metrics)
    if len(layers) <= 30:
        for (row, col), value in np.ndenumerate(relative):
            if value <= 0:
                text = "neg" if value < 0 else "0"
            elif value > 1:
                text = f"×{value:.3g}"
            else:
                text = f"{value:.2f}" if value >= 0.01 else f"{value:.0e}"
            text += "?" if noisy[row, col] else ""
            color = "white" if 0 <= value < 0.1 else "black"
            ax.text(col, row, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel(
        "layer (forward order); head: × the top pretrained layer; red: negative; "
        "?: within 2 standard errors of 0",
        fontsize=8,
    )
    ax.set_title(title or "Per-element importance by layer")
    fig.colorbar(
        image, ax=ax, fraction=0.03, pad=0.02, label="relative to the top pretrained layer"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)


TENSOR_KINDS = (  # (kind, marker, words in a tensor's name), first match wins; display only
    ("norm", "s", ("norm", "ln_", ".ln", "bn", "batchnorm")),
    ("attention", "o", ("attn", "attention", "query", "key", "value", "q_proj", "k_proj")),
    ("feed-forward", "^", ("intermediate", "mlp", "ffn", "fc", "output.dense", "dense")),
    ("embedding", "D", ("embed", "wte", "wpe", "patch", "cls_token", "pos_")),
    ("convolution", "P", ("conv", "downsample")),
)


def tensor_kind(name: str) -> tuple[str, str]:
    """What a tensor is, for the plan plot's markers, read from its name ("other" when the
    name says nothing): (kind, matplotlib marker)."""
    lowered = name.lower()
    for kind, marker, words in TENSOR_KINDS:
        if any(word in lowered for word in words):
            return kind, marker
    return "other", "X"


def plot_plan(plan: Plan, path: str | Path) -> None:
    """Each tensor's lr multiplier by layer, one marker per kind of tensor (attention,
    feed-forward, norm, ...; size: its parameter count); frozen tensors in grey at zero. The
    legend stands beside the axes, clear of the points."""
    layers = sorted({(t.layer_index, t.layer) for t in plan.tensors})
    position = {index: i for i, (index, _) in enumerate(layers)}
    fig = Figure(figsize=(max(7.0, 0.55 * len(layers) + 4), 3.8))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    kinds = {t.name: tensor_kind(t.name) for t in plan.tensors}
    for (kind, marker), frozen in sorted({(kinds[t.name], t.frozen) for t in plan.tensors}):
        chosen = [t for t in plan.tensors if t.frozen == frozen and kinds[t.name][0] == kind]
        x = [position[t.layer_index] + rng.uniform(-0.25, 0.25) for t in chosen]
        ax.scatter(
            x,
            [t.lr_multiplier for t in chosen],
            s=[10 + 40 * np.log10(t.numel) / 8 for t in chosen],
            marker=marker,
            c="0.7" if frozen else "tab:blue",
            label=f"{kind}{' (frozen)' if frozen else ''}",
            alpha=0.8,
            edgecolors="none",
        )
    for i, (index, _) in enumerate(layers):
        members = [t for t in plan.tensors if t.layer_index == index]
        share = sum(t.numel for t in members if not t.frozen) / sum(t.numel for t in members)
        ax.text(
            i,
            1.02,
            f"{share:.0%}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            fontsize=7,
            color="0.3",
        )
    ax.set_xticks(range(len(layers)), [name for _, name in layers], rotation=45, ha="right")
    ax.set_ylabel("lr multiplier")
    ax.set_ylim(bottom=-0.05)
    ax.set_title(
        f"{plan.strategy}: {plan.totals['trainable_fraction']:.2%} of parameters train "
        "(top: share trained per layer)",
        fontsize=9,
        pad=18,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_confusion(matrix: pd.DataFrame, path: str | Path, title: str) -> None:
    """Row-normalised confusion matrix with the counts written in each cell."""
    counts = matrix.to_numpy()
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.5, 0.6 * len(matrix) + 2.5)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), matrix.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(matrix) <= 25:
        for (row, col), count in np.ndenumerate(counts):
            ax.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[row, col] > 0.5 else "black",
            )
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_leaderboard(
    summary: pd.DataFrame, path: str | Path, experiment: str, num_labels: int = 0
) -> None:
    """Test macro-F1 (mean ± std over seeds) per strategy, one panel per shot count; baselines
    (no fine-tuning) hatched grey, and the macro-F1 of guessing uniformly at random
    (1 / classes) as a dashed line."""
    shot_values = list(dict.fromkeys(summary["shots"]))
    fig = Figure(figsize=(4.5 * len(shot_values) + 1, 3.2 + 0.3 * summary["strategy"].nunique()))
    axes = fig.subplots(
        1,
        len(shot_values),
        squeeze=False,
        sharex=True,
    )
    for ax, shots in zip(axes[0], shot_values, strict=True):
        part = summary[summary["shots"] == shots].sort_values("test_macro_f1_mean")
        baseline = part["trainable_fraction"].isna().to_numpy()
        bars = ax.barh(
            part["strategy"],
            part["test_macro_f1_mean"],
            xerr=part["test_macro_f1_std"],
            color=["0.75" if b else "tab:blue" for b in baseline],
            alpha=0.8,
            capsize=3,
        )
        for bar, is_baseline in zip(bars, baseline, strict=True):
            if is_baseline:
                bar.set_hatch("//")
        if num_labels > 1:
            ax.axvline(1 / num_labels, color="tab:red", linestyle="--", linewidth=1)
            ax.text(1 / num_labels, -0.6, " chance", color="tab:red", fontsize=7, va="top")
        rows = zip(
            part["test_macro_f1_mean"],
            part["test_macro_f1_std"],
            part["trainable_fraction"],
            strict=True,
        )
        for y, (value, std, fraction) in enumerate(rows):
            ax.text(
                min(value + std, 1.0) + 0.02,
                y,
                f"{value:.3f} "
                + ("(no fine-tuning)" if pd.isna(fraction) else f"({percent(fraction)} trained)"),
                va="center",
                fontsize=8,
            )
        ax.set_xlim(0, 1.35)
        ax.set_title(f"{shots} shots per class")
        ax.set_xlabel("test macro-F1 (mean ± std over seeds)")
    fig.suptitle(experiment)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_tradeoffs(board: pd.DataFrame, path: str | Path, experiment: str) -> None:
    """Test macro-F1 against the fraction of parameters trained and against training time:
    one point per run, one colour per strategy, one row of panels per shot count."""
    shot_values = list(dict.fromkeys(board["shots"]))
    strategies = sorted(board["strategy"].unique())
    colors = {s: matplotlib.colormaps["tab10"](i % 10) for i, s in enumerate(strategies)}
    fig = Figure(figsize=(12, 3.6 * len(shot_values)))
    axes = fig.subplots(len(shot_values), 2, squeeze=False)
    for row, shots in enumerate(shot_values):
        part = board[board["shots"] == shots]
        for column, (x, label, log) in enumerate(
            [
                ("trainable_fraction", "fraction of parameters trained", True),
                ("train_seconds", "training time (s)", False),
            ]
        ):
            ax = axes[row][column]
            for strategy, runs in part.groupby("strategy"):
                ax.scatter(
                    runs[x],
                    runs["test_macro_f1"],
                    color=colors[strategy],
                    label=strategy,
                    s=30,
                    alpha=0.85,
                )
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("test macro-F1")
            ax.set_title(f"{shots} shots per class", fontsize=10)
            ax.grid(alpha=0.3)
    # Outside the panels, so that it never hides a point.
    axes[0][1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.suptitle(f"{experiment}: quality against cost (one point per run)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_curves(histories: pd.DataFrame, path: str | Path, experiment: str) -> None:
    """Validation macro-F1 and training loss per epoch: one line per run, one colour per
    strategy, one row of panels per shot count (``histories``: every run's history.csv with
    its strategy, shots and seed)."""
    shot_values = list(dict.fromkeys(histories["shots"]))
    fig = Figure(figsize=(10, 3.2 * len(shot_values)))
    axes = fig.subplots(len(shot_values), 2, squeeze=False)
    palette = matplotlib.colormaps["tab20"].colors
    colours = {
        s: palette[i % len(palette)] for i, s in enumerate(dict.fromkeys(histories["strategy"]))
    }
    for row, shots in zip(axes, shot_values, strict=True):
        part = histories[histories["shots"] == shots]
        for (strategy, seed), run in part.groupby(["strategy", "seed"], sort=False):
            label = strategy if seed == part[part["strategy"] == strategy]["seed"].min() else None
            for ax, column in zip(row, ("val_macro_f1", "train_loss"), strict=True):
                ax.plot(run["epoch"], run[column], color=colours[strategy], label=label, lw=1.2)
        row[0].set_ylabel(f"{shots} shots\nval macro-F1")
        row[1].set_ylabel("train loss")
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{experiment}: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_generalisation(
    summary: pd.DataFrame, path: str | Path, experiment: str, shift_names: Sequence[str] = ()
) -> None:
    """Macro-F1 against the fraction of parameters trained, one point per strategy (mean ±
    std over seeds): in distribution (left) and under shift (right: the mean over the shifted
    test splits), one row per shot count, panels of a row on one scale; with several shot
    counts, a last row of shot curves (macro-F1 against examples per class). Baselines, which
    train no network parameter, are dashed lines."""
    shot_values = list(dict.fromkeys(summary["shots"]))
    panels = [("test_macro_f1", "in distribution")]
    if shift_names and summary["shift_macro_f1_mean"].notna().any():
        panels.append(("shift_macro_f1", f"under shift ({len(shift_names)} shifted test splits)"))
    strategies = sorted(summary.loc[summary["trainable_fraction"].notna(), "strategy"].unique())
    colors = {s: matplotlib.colormaps["tab10"](i % 10) for i, s in enumerate(strategies)}
    numeric = [s for s in shot_values if str(s) != "all"]
    curves = len(numeric) > 1  # a last row: the shot curves
    rows = len(shot_values) + curves
    fig = Figure(figsize=(6.2 * len(panels) + 2.2, 3.8 * rows))
    axes = fig.subplots(rows, len(panels), squeeze=False)
    for row, shots in enumerate(shot_values):
        part = summary[summary["shots"] == shots]
        for column, (metric, title) in enumerate(panels):
            ax = axes[row][column]
            for r in part.itertuples(index=False):
                mean, std = getattr(r, f"{metric}_mean"), getattr(r, f"{metric}_std")
                if pd.isna(mean):
                    continue
                if pd.isna(r.trainable_fraction):
                    ax.axhline(mean, color="0.5", linestyle="--", linewidth=1)
                    ax.annotate(
                        r.strategy, (0.01, mean), xycoords=("axes fraction", "data"),
                        fontsize=7, color="0.4", va="bottom",
                    )  # fmt: skip
                    continue
                ax.errorbar(
                    r.trainable_fraction, mean, yerr=std, fmt="o", color=colors[r.strategy],
                    label=r.strategy, capsize=3, markersize=6,
                )  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("fraction of parameters trained")
            ax.set_ylabel("macro-F1")
            ax.set_title(f"{shots} shots per class: {title}", fontsize=10)
            ax.grid(alpha=0.3)
    if curves:
        tuned = summary[summary["strategy"].isin(strategies) & summary["shots"].isin(numeric)]
        for column, (metric, title) in enumerate(panels):
            ax = axes[-1][column]
            for strategy, part in tuned.groupby("strategy"):
                part = part.assign(k=part["shots"].astype(int)).sort_values("k")
                ax.errorbar(
                    part["k"], part[f"{metric}_mean"], yerr=part[f"{metric}_std"],
                    color=colors[strategy], marker="o", capsize=3, label=strategy,
                )  # fmt: skip
            ax.set_xscale("log")
            ax.set_xticks(
                sorted(int(k) for k in numeric), [str(k) for k in sorted(map(int, numeric))]
            )
            ax.minorticks_off()
            ax.set_xlabel("examples per class")
            ax.set_ylabel("macro-F1")
            ax.set_title(f"shot curves: {title}", fontsize=10)
            ax.grid(alpha=0.3)
    for row in axes[: len(shot_values)]:
        low = min(ax.get_ylim()[0] for ax in row)
        high = max(ax.get_ylim()[1] for ax in row)
        for ax in row:
            ax.set_ylim(low, high)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[0][-1].legend(
        unique.values(), unique.keys(), fontsize=8, loc="upper left",
        bbox_to_anchor=(1.02, 1), borderaxespad=0,
    )  # fmt: skip
    fig.suptitle(f"{experiment}: macro-F1 against parameters trained (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
