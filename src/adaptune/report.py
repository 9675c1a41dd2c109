"""The leaderboard: one row per (strategy, shots, seed), and a summary over seeds."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from adaptune.figures import percent, plot_leaderboard, plot_tradeoffs

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
