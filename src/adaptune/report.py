"""The leaderboard: one row per (strategy, shots, seed), and a summary over seeds.

Where a strategy swept some of its settings (:mod:`adaptune.sweeps`), each of its runs is
first replaced by the value best on validation for that (shots, seed)
(:func:`select_values`): the tables then hold one row per strategy, with the test split
reported for the chosen value only. Where ``evaluate.shifts`` is set, each row also holds the
mean macro-F1 over the shifted test splits and its drop from the in-distribution macro-F1.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from adaptune import sweeps, tracking
from adaptune.figures import (
    percent,
    plot_curves,
    plot_generalisation,
    plot_leaderboard,
    plot_tradeoffs,
)

log = logging.getLogger(__name__)

LEADERBOARD_COLUMNS = [
    "strategy",
    "setting",
    "shots",
    "seed",
    "test_accuracy",
    "test_macro_f1",
    "shift_macro_f1",
    "shift_drop",
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


def leaderboard(runs: Iterable[str | Path | Mapping[str, Any]]) -> pd.DataFrame:
    """Every run's ``metrics.json`` (written by ``evaluate``; a path, or its content already
    read) in one table, best macro-F1 first within each shot count."""
    rows = [r if isinstance(r, Mapping) else json.loads(Path(r).read_text()) for r in runs]
    table = pd.DataFrame(rows)
    table = table[[c for c in LEADERBOARD_COLUMNS if c in table.columns]]
    table["shots"] = table["shots"].astype(str)
    table["setting"] = table["strategy"].map(sweeps.setting)
    for column in ("shift_macro_f1", "shift_drop"):
        if column not in table.columns:
            table[column] = np.nan
    for column in ("best_val_macro_f1", "trainable_fraction", "trainable_params", "shift_drop"):
        if column in table.columns:
            table[column] = pd.to_numeric(table[column])
    return (
        table.assign(_order=_shots_order(table["shots"]))
        .sort_values(
            ["_order", "test_macro_f1", "strategy", "seed"], ascending=[True, False, True, True]
        )
        .drop(columns="_order")
        .reset_index(drop=True)
    )


# What the choice of a swept value may read: never a test metric.
SELECTION_COLUMNS = ["strategy", "shots", "seed", "best_val_macro_f1"]


def select_values(board: pd.DataFrame, order: Iterable[str] = ()) -> pd.DataFrame:
    """Each swept strategy's runs reduced to one per (shots, seed): the value with the best
    validation macro-F1 (ties: the value listed first in ``order``, the config's order of
    strategies, then the name). The chosen row keeps its test metrics and is renamed to the
    strategy (``llrd@lr=0.0001`` -> ``llrd``, ``setting`` ``lr=0.0001``). The choice reads
    :data:`SELECTION_COLUMNS` alone; strategies that swept nothing pass unchanged."""
    view = board[SELECTION_COLUMNS].copy()
    position = {name: index for index, name in enumerate(order)}
    view["family"] = view["strategy"].map(sweeps.family)
    view["position"] = view["strategy"].map(lambda name: position.get(name, len(position)))
    ranked = view.sort_values(
        ["best_val_macro_f1", "position", "strategy"],
        ascending=[False, True, True],
        na_position="last",
    )
    chosen = ranked.groupby(["family", "shots", "seed"], sort=False, dropna=False).head(1)
    tried = view.groupby(["family", "shots", "seed"], dropna=False)["strategy"].transform("size")
    selected = board.loc[sorted(chosen.index)].copy()
    selected["values_tried"] = tried.loc[selected.index].to_numpy()
    selected["strategy"] = selected["strategy"].map(sweeps.family)
    return selected.reset_index(drop=True)


def summarise(board: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds for each (shots, strategy), with the values its
    sweep chose (``lr=0.0001 x3, lr=3e-05 x2``)."""
    grouped = board.groupby(["shots", "strategy"], sort=False)
    summary = grouped.agg(
        seeds=("seed", "nunique"),
        test_macro_f1_mean=("test_macro_f1", "mean"),
        test_macro_f1_std=("test_macro_f1", "std"),
        test_accuracy_mean=("test_accuracy", "mean"),
        test_accuracy_std=("test_accuracy", "std"),
        shift_macro_f1_mean=("shift_macro_f1", "mean"),
        shift_macro_f1_std=("shift_macro_f1", "std"),
        shift_drop_mean=("shift_drop", "mean"),
        val_macro_f1_mean=("best_val_macro_f1", "mean"),
        trainable_fraction=("trainable_fraction", "mean"),
        train_seconds_mean=("train_seconds", "mean"),
        chosen=("setting", _chosen_values),
    ).reset_index()
    summary = summary.fillna(
        {"test_macro_f1_std": 0.0, "test_accuracy_std": 0.0, "shift_macro_f1_std": 0.0}
    )
    return (
        summary.assign(_order=_shots_order(summary["shots"]))
        .sort_values(["_order", "test_macro_f1_mean"], ascending=[True, False])
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def _chosen_values(settings: pd.Series) -> str:
    """How often each swept value was chosen over the seeds ("" where nothing was swept)."""
    counts = settings[settings != ""].value_counts()
    return ", ".join(f"{value} x{count}" for value, count in counts.items())


def paired_difference(
    board: pd.DataFrame,
    shots: str,
    strategy: str,
    reference: str,
    metric: str = "test_macro_f1",
) -> dict:
    """``metric`` (test macro-F1; ``shift_macro_f1`` under shift) of ``strategy`` minus
    ``reference`` over the seeds both ran (paired by seed): the mean difference, its 95%
    t-interval (none with one seed) and the seed count."""
    part = board[board["shots"] == shots]
    a = part[part["strategy"] == strategy].set_index("seed")[metric]
    b = part[part["strategy"] == reference].set_index("seed")[metric]
    diffs = (a - b).dropna()
    n = len(diffs)
    if n == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(diffs.mean())
    if n == 1:
        return {"diff": mean, "low": float("nan"), "high": float("nan"), "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / np.sqrt(n))
    return {"diff": mean, "low": mean - half, "high": mean + half, "n": n}


def interval(d: dict) -> str:
    """``+0.0123 [-0.004, +0.029], n=3`` (or ``n=1, no interval``)."""
    if d["n"] == 0:
        return "–"
    if d["n"] == 1:
        return f"{d['diff']:+.4f} (n=1, no interval)"
    return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], n={d['n']}"


def best_per_shots(summary: pd.DataFrame, board: pd.DataFrame) -> pd.DataFrame:
    """For each shot count, the strategy selected on validation (highest mean best-epoch
    validation macro-F1 over seeds; only fine-tuned strategies have one; ties go to the one
    that trains fewer parameters), its test macro-F1,
    the run (seed) whose model is the one to use, and its paired difference to full
    fine-tuning across seeds. The test split plays no part in the choice."""
    rows = []
    for shots, part in summary.groupby("shots", sort=False):
        # Ties on validation go to the strategy that trains less, then to the name: never to
        # the order of the test scores.
        ranked = part.dropna(subset=["val_macro_f1_mean"]).sort_values(
            ["val_macro_f1_mean", "trainable_fraction", "strategy"], ascending=[False, True, True]
        )
        if ranked.empty:
            continue
        best = ranked.iloc[0]
        runs = board[(board["shots"] == shots) & (board["strategy"] == best["strategy"])]
        chosen = runs.sort_values(["best_val_macro_f1", "seed"], ascending=[False, True]).iloc[0]
        versus = paired_difference(board, shots, best["strategy"], "full")
        shifted = paired_difference(board, shots, best["strategy"], "full", "shift_macro_f1")
        rows.append(
            {
                "shots": shots,
                "selected_strategy": best["strategy"],
                "val_macro_f1_mean": best["val_macro_f1_mean"],
                "test_macro_f1_mean": best["test_macro_f1_mean"],
                "test_macro_f1_std": best["test_macro_f1_std"],
                "seeds": int(best["seeds"]),
                "runner_up_on_val": ranked.iloc[1]["strategy"] if len(ranked) > 1 else "",
                "diff_vs_full": versus["diff"],
                "diff_vs_full_low": versus["low"],
                "diff_vs_full_high": versus["high"],
                "shift_macro_f1_mean": best["shift_macro_f1_mean"],
                "shift_diff_vs_full": shifted["diff"],
                "shift_diff_vs_full_low": shifted["low"],
                "shift_diff_vs_full_high": shifted["high"],
                "model_seed": int(chosen["seed"]),
                "model_strategy": sweeps.variant(best["strategy"], chosen.get("setting", "")),
                "mlflow_run_id": chosen.get("mlflow_run_id", ""),
            }
        )
    return pd.DataFrame(rows)


def headline(best: pd.DataFrame) -> list[str]:
    """One sentence per shot count: what was selected on validation and how it did on test."""
    lines = []
    for r in best.itertuples(index=False):
        versus = {"diff": r.diff_vs_full, "low": r.diff_vs_full_low, "high": r.diff_vs_full_high}
        versus["n"] = r.seeds if not pd.isna(r.diff_vs_full) else 0
        compared = (
            "it is full fine-tuning"
            if r.selected_strategy == "full"
            else f"test macro-F1 minus full fine-tuning's: {interval(versus)}"
        )
        shifted = ""
        if not pd.isna(r.shift_macro_f1_mean):
            shifted = f"; under shift macro-F1 {r.shift_macro_f1_mean:.4f}"
            if r.selected_strategy != "full" and not pd.isna(r.shift_diff_vs_full):
                shift_versus = {
                    "diff": r.shift_diff_vs_full,
                    "low": r.shift_diff_vs_full_low,
                    "high": r.shift_diff_vs_full_high,
                    "n": r.seeds,
                }
                shifted += f", minus full's {interval(shift_versus)}"
        lines.append(
            f"- **{r.shots} shots per class**: **{r.selected_strategy}** selected on validation "
            f"(val macro-F1 {r.val_macro_f1_mean:.4f}); test macro-F1 {r.test_macro_f1_mean:.4f}"
            f"{'' if r.seeds < 2 else f' ± {r.test_macro_f1_std:.4f} (std over {r.seeds} seeds)'}"
            f"; {compared}{shifted}."
        )
    return lines


def to_markdown(
    board: pd.DataFrame,
    summary: pd.DataFrame,
    experiment: str,
    shift_names: Iterable[str] = (),
) -> str:
    best = best_per_shots(summary, board)
    lines = [f"# Leaderboard: {experiment}", "", "## Selected strategy per shot count", ""]
    lines += [
        "Chosen on the validation split (mean best-epoch validation macro-F1 over seeds); the "
        "test split is only reported. Differences to full fine-tuning are paired by seed, with "
        "a 95% t-interval where there are several seeds.",
        "",
        *headline(best),
    ]
    lines += ["", "## Every strategy (mean ± std over seeds; n=1: one seed, no spread)", ""]
    shifted = summary["shift_macro_f1_mean"].notna().any()
    swept = (summary["chosen"] != "").any()
    if shifted:
        lines += [
            "Under shift: the mean macro-F1 over the shifted test splits "
            f"({', '.join(shift_names)}); drop: in-distribution minus shifted.",
            "",
        ]
    if swept:
        lines += [
            "Swept strategies: per (shots, seed) the value best on validation; chosen: how "
            "often each value was (every value's runs are in sweep.csv).",
            "",
        ]
    lines += [
        "| shots | strategy | seeds | val macro-F1 | test macro-F1 | test accuracy | "
        "vs full (paired) | "
        + ("under shift | drop | vs full under shift | " if shifted else "")
        + "trainable | train s |"
        + (" chosen |" if swept else ""),
        "|---|---|---:|---:|---:|---:|---|"
        + ("---:|---:|---|" if shifted else "")
        + "---:|---:|"
        + ("---|" if swept else ""),
    ]
    for r in summary.itertuples(index=False):
        acc_spread, f1_spread = (
            (f" ± {r.test_accuracy_std:.4f}", f" ± {r.test_macro_f1_std:.4f}")
            if r.seeds > 1
            else ("", "")
        )
        val = "–" if pd.isna(r.val_macro_f1_mean) else f"{r.val_macro_f1_mean:.4f}"
        paired = paired_difference(board, r.shots, r.strategy, "full")
        versus = "–" if r.strategy == "full" else interval(paired)
        shift_cells = ""
        if shifted:
            if pd.isna(r.shift_macro_f1_mean):
                shift_cells = "– | – | – | "
            else:
                spread = f" ± {r.shift_macro_f1_std:.4f}" if r.seeds > 1 else ""
                shift_paired = paired_difference(
                    board, r.shots, r.strategy, "full", "shift_macro_f1"
                )
                shift_versus = "–" if r.strategy == "full" else interval(shift_paired)
                shift_cells = (
                    f"{r.shift_macro_f1_mean:.4f}{spread} | {r.shift_drop_mean:+.4f} | "
                    f"{shift_versus} | "
                )
        lines.append(
            f"| {r.shots} | {r.strategy} | {r.seeds} | {val} | {r.test_macro_f1_mean:.4f}"
            f"{f1_spread} | {r.test_accuracy_mean:.4f}{acc_spread} | {versus} | "
            f"{shift_cells}{percent(r.trainable_fraction)} | "
            f"{r.train_seconds_mean:.1f} |" + (f" {r.chosen or '–'} |" if swept else "")
        )
    lines += ["", "## Every run", ""]
    lines += [
        "| shots | strategy | seed | test macro-F1 | test accuracy | trainable params | "
        "trainable | train s | best epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in board.itertuples(index=False):
        name = f"{r.strategy} ({r.setting})" if getattr(r, "setting", "") else r.strategy
        lines.append(
            f"| {r.shots} | {name} | {r.seed} | {r.test_macro_f1:.4f} | "
            f"{r.test_accuracy:.4f} | {r.trainable_params:,} | {percent(r.trainable_fraction)} | "
            f"{r.train_seconds:.1f} | {_epoch(r.best_epoch)} |"
        )
    return "\n".join(lines) + "\n"


def run_histories(runs: Mapping[Path, Mapping[str, Any]]) -> pd.DataFrame:
    """Every fine-tuning run's ``history.csv`` (beside its ``metrics.json``, the keys of
    ``runs``), with its strategy, shots and seed; baselines have none."""
    frames = []
    for path, row in runs.items():
        history = path.with_name("history.csv")
        if history.is_file():
            frames.append(
                pd.read_csv(history).assign(
                    strategy=row["strategy"], shots=str(row["shots"]), seed=row["seed"]
                )
            )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def html_page(markdown_lines: str, best: pd.DataFrame, config: Mapping[str, Any]) -> str:
    """The leaderboard as one page that stands alone (what ``snakemake --report`` shows):
    the headline, the tables and the experiment's config."""
    import html

    body, table = [], []

    def flush() -> None:
        if table:
            head, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
            cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
            out = [f"<table><tr>{cells}</tr>"]
            for r in rows[1:]:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
            body.append("".join(out) + "</table>")
            table.clear()

    for line in markdown_lines.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        text = html.escape(line)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        if line.startswith("# "):
            body.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("- "):
            body.append(f"<p class=headline>{text[2:]}</p>")
        elif line:
            body.append(f"<p>{text}</p>")
    flush()
    body.append("<h2>Config</h2><pre>" + html.escape(yaml.safe_dump(dict(config))) + "</pre>")
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:120em}td{white-space:nowrap}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:right}th{background:#eee}td:nth-child(-n+2){text-align:left}"
        ".headline{font-size:1.1em;background:#eef6ee;padding:6px}"
    )
    return f"<!doctype html><meta charset=utf-8><style>{style}</style>" + "".join(body) + "\n"


def register_champions(
    best: pd.DataFrame, run_folders: Mapping[tuple, Path], experiment: Mapping[str, str]
) -> None:
    """The selected run of each shot count becomes the ``champion`` of the registered model
    ``<experiment>-k<shots>``."""
    for r in best.itertuples(index=False):
        folder = run_folders[(r.model_strategy, str(r.shots), r.model_seed)]
        summary = json.loads((folder / "train_summary.json").read_text())
        if not summary.get("mlflow_model_uri"):
            continue
        name = f"{experiment['experiment_name']}-k{r.shots}"
        version = tracking.register_champion(
            experiment["tracking_uri"],
            name,
            summary["mlflow_model_uri"],
            summary["mlflow_run_id"],
            f"{r.selected_strategy}, seed {r.model_seed}: selected on validation "
            f"(val macro-F1 {r.val_macro_f1_mean:.4f}); test macro-F1 {r.test_macro_f1_mean:.4f}",
        )
        log.info("registered model %s version %d is now @%s", name, version, tracking.CHAMPION)


def run_report(
    metric_files: list[str],
    experiment: str,
    outputs: dict[str, str],
    config: Mapping[str, Any] | None = None,
    experiment_path: str | None = None,
    description: str | None = None,
) -> pd.DataFrame:
    """The ``report`` stage: leaderboard CSV and markdown, a page that stands alone (headline,
    tables, config), summary over seeds, the selected strategy per shot count (registered as
    ``champion`` when ``experiment_path`` names the MLflow experiment), and plots."""
    runs = {Path(path): json.loads(Path(path).read_text()) for path in metric_files}
    every = leaderboard(runs.values())
    board = select_values(every, (config or {}).get("strategies", {}))
    summary = summarise(board)
    best = best_per_shots(summary, board)
    run_folders = {
        (row["strategy"], str(row["shots"]), row.get("seed", 0)): path.parent
        for path, row in runs.items()
    }
    num_labels = max(len(row.get("per_class", {})) for row in runs.values())
    best["model_dir"] = [
        str(run_folders[(r.model_strategy, str(r.shots), r.model_seed)] / "model")
        for r in best.itertuples(index=False)
    ]
    board.to_csv(outputs["leaderboard"], index=False)
    if "sweep" in outputs:
        every.to_csv(outputs["sweep"], index=False)
    summary.to_csv(outputs["summary"], index=False)
    shift_names = sorted({name for row in runs.values() for name in row.get("shifts", {})})
    markdown = to_markdown(board, summary, experiment, shift_names)
    Path(outputs["markdown"]).write_text(markdown)
    Path(outputs["page"]).write_text(html_page(markdown, best, config or {}))
    plot_leaderboard(summary, outputs["plot"], experiment, num_labels)
    plot_tradeoffs(board, outputs["tradeoffs"], experiment)
    if "generalisation" in outputs:
        plot_generalisation(summary, outputs["generalisation"], experiment, shift_names)
    histories = run_histories(runs)
    if not histories.empty:
        plot_curves(histories, outputs["curves"], experiment)
    else:
        Path(outputs["curves"]).touch()
    best.to_csv(outputs["best"], index=False)
    if "first_page" in outputs:
        # The first page of `snakemake --report`: the workflow's description, then the result.
        intro = Path(description).read_text() if description else ""
        result = "\n".join(headline(best))
        Path(outputs["first_page"]).write_text(
            f"{intro}\n\nResult\n------\n\n{result}\n\n"
            "Selected on the validation split; the tables are under *1. Result*.\n"
        )
    for line in headline(best):
        log.info("%s", line.replace("**", ""))
    if experiment_path is not None:
        register_champions(best, run_folders, tracking.read_experiment(experiment_path))
    return board
