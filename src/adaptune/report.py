"""The leaderboard: one row per (strategy, shots, seed), and a summary over seeds."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

LEADERBOARD_COLUMNS = [
    "strategy",
    "shots",
    "seed",
    "test_accuracy",
    "test_macro_f1",
    "trainable_params",
    "trainable_fraction",
    "train_seconds",
    "best_epoch",
    "best_val_macro_f1",
    "test_loss",
    "test_examples",
    "mlflow_run_id",
]


def percent(fraction: float) -> str:
    """0.0000847 -> '0.00847%', 1.0 -> '100%': three significant digits at any scale; '–'
    where it does not apply (a baseline that fine-tunes nothing)."""
    if fraction is None or pd.isna(fraction):
        return "–"
    return f"{100 * fraction:.3g}%"


def _epoch(value: float | None) -> str:
    return "–" if value is None or pd.isna(value) else str(int(value))


def _shots_order(shots: pd.Series) -> pd.Series:
    """Sort key: numeric shot counts ascending, ``all`` last."""
    return shots.map(lambda s: float("inf") if str(s) == "all" else float(s))


def leaderboard(metric_files: Iterable[str | Path]) -> pd.DataFrame:
    """Collect every run's ``metrics.json`` (written by ``evaluate``) into one table, best
    macro-F1 first within each shot count."""
    rows = [json.loads(Path(path).read_text()) for path in metric_files]
    table = pd.DataFrame(rows)
    table = table[[c for c in LEADERBOARD_COLUMNS if c in table.columns]]
    table["shots"] = table["shots"].astype(str)
    return (
        table.assign(_order=_shots_order(table["shots"]))
        .sort_values(
            ["_order", "test_macro_f1", "strategy", "seed"], ascending=[True, False, True, True]
        )
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def summarise(board: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds for each (shots, strategy)."""
    grouped = board.groupby(["shots", "strategy"], sort=False)
    summary = grouped.agg(
        seeds=("seed", "nunique"),
        test_macro_f1_mean=("test_macro_f1", "mean"),
        test_macro_f1_std=("test_macro_f1", "std"),
        test_accuracy_mean=("test_accuracy", "mean"),
        test_accuracy_std=("test_accuracy", "std"),
        trainable_fraction=("trainable_fraction", "mean"),
        train_seconds_mean=("train_seconds", "mean"),
    ).reset_index()
    summary = summary.fillna({"test_macro_f1_std": 0.0, "test_accuracy_std": 0.0})
    return (
        summary.assign(_order=_shots_order(summary["shots"]))
        .sort_values(["_order", "test_macro_f1_mean"], ascending=[True, False])
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def best_per_shots(summary: pd.DataFrame) -> pd.DataFrame:
    """The best strategy (mean test macro-F1) for each shot count, its margin over the
    runner-up and over full fine-tuning where that ran."""
    rows = []
    for shots, part in summary.groupby("shots", sort=False):
        ranked = part.sort_values("test_macro_f1_mean", ascending=False)
        best = ranked.iloc[0]
        full = part.loc[part["strategy"] == "full", "test_macro_f1_mean"]
        rows.append(
            {
                "shots": shots,
                "best_strategy": best["strategy"],
                "test_macro_f1_mean": best["test_macro_f1_mean"],
                "test_macro_f1_std": best["test_macro_f1_std"],
                "runner_up": ranked.iloc[1]["strategy"] if len(ranked) > 1 else "",
                "margin_over_runner_up": (
                    best["test_macro_f1_mean"] - ranked.iloc[1]["test_macro_f1_mean"]
                    if len(ranked) > 1
                    else float("nan")
                ),
                "margin_over_full": (
                    best["test_macro_f1_mean"] - full.iloc[0] if len(full) else float("nan")
                ),
            }
        )
    return pd.DataFrame(rows)


def to_markdown(board: pd.DataFrame, summary: pd.DataFrame, experiment: str) -> str:
    lines = [f"# Leaderboard: {experiment}", "", "## Best strategy per shot count", ""]
    lines += [
        "| shots | best | test macro-F1 | runner-up | margin | margin over full |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in best_per_shots(summary).itertuples(index=False):
        lines.append(
            f"| {r.shots} | {r.best_strategy} | {r.test_macro_f1_mean:.4f} ± "
            f"{r.test_macro_f1_std:.4f} | {r.runner_up} | {r.margin_over_runner_up:+.4f} | "
            f"{r.margin_over_full:+.4f} |"
        )
    lines += ["", "## Mean ± std over seeds", ""]
    lines += [
        "| shots | strategy | seeds | test macro-F1 | test accuracy | trainable | train s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary.itertuples(index=False):
        lines.append(
            f"| {r.shots} | {r.strategy} | {r.seeds} | {r.test_macro_f1_mean:.4f} ± "
            f"{r.test_macro_f1_std:.4f} | {r.test_accuracy_mean:.4f} ± {r.test_accuracy_std:.4f} "
            f"| {percent(r.trainable_fraction)} | {r.train_seconds_mean:.1f} |"
        )
    lines += ["", "## Every run", ""]
    lines += [
        "| shots | strategy | seed | test macro-F1 | test accuracy | trainable params | "
        "trainable | train s | best epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in board.itertuples(index=False):
        lines.append(
            f"| {r.shots} | {r.strategy} | {r.seed} | {r.test_macro_f1:.4f} | "
            f"{r.test_accuracy:.4f} | {r.trainable_params:,} | {percent(r.trainable_fraction)} | "
            f"{r.train_seconds:.1f} | {_epoch(r.best_epoch)} |"
        )
    return "\n".join(lines) + "\n"


def plot_leaderboard(summary: pd.DataFrame, path: str | Path, experiment: str) -> None:
    """Test macro-F1 (mean ± std over seeds) per strategy, one panel per shot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shot_values = list(dict.fromkeys(summary["shots"]))
    fig, axes = plt.subplots(
        1,
        len(shot_values),
        figsize=(4.5 * len(shot_values) + 1, 3.2 + 0.3 * summary["strategy"].nunique()),
        squeeze=False,
        sharex=True,
    )
    for ax, shots in zip(axes[0], shot_values, strict=True):
        part = summary[summary["shots"] == shots].sort_values("test_macro_f1_mean")
        ax.barh(
            part["strategy"],
            part["test_macro_f1_mean"],
            xerr=part["test_macro_f1_std"],
            color="tab:blue",
            alpha=0.8,
            capsize=3,
        )
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
    plt.close(fig)


def plot_tradeoffs(board: pd.DataFrame, path: str | Path, experiment: str) -> None:
    """Test macro-F1 against the fraction of parameters trained and against training time:
    one point per run, one colour per strategy, one row of panels per shot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shot_values = list(dict.fromkeys(board["shots"]))
    strategies = sorted(board["strategy"].unique())
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(strategies)}
    fig, axes = plt.subplots(
        len(shot_values), 2, figsize=(12, 3.6 * len(shot_values)), squeeze=False
    )
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
    plt.close(fig)


def run_report(metric_files: list[str], experiment: str, outputs: dict[str, str]) -> pd.DataFrame:
    """The ``report`` stage: leaderboard CSV and markdown, summary over seeds, and a plot."""
    board = leaderboard(metric_files)
    summary = summarise(board)
    board.to_csv(outputs["leaderboard"], index=False)
    summary.to_csv(outputs["summary"], index=False)
    Path(outputs["markdown"]).write_text(to_markdown(board, summary, experiment))
    plot_leaderboard(summary, outputs["plot"], experiment)
    plot_tradeoffs(board, outputs["tradeoffs"], experiment)
    best_per_shots(summary).to_csv(outputs["best"], index=False)
    return board
