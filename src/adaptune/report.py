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
from collections.abc import Iterable, Mapping, Sequence
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
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "weight_change",
    "cka_drift",
    "stopped_epoch",
    "best_epoch",
    "best_val_macro_f1",
    "test_loss",
    "test_examples",
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
    for column in (
        "optimizer_state_bytes",
        "peak_memory_bytes",
        "stopped_epoch",
        "weight_change",
        "cka_drift",
    ):
        if column not in table.columns:  # runs made before adaptune recorded them, baselines
            table[column] = np.nan
    for column in (
        "best_val_macro_f1",
        "trainable_fraction",
        "trainable_params",
        "shift_drop",
        "optimizer_state_bytes",
        "peak_memory_bytes",
        "weight_change",
        "cka_drift",
    ):
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
    sweep chose (``lr=0.0001 x3, lr=3e-05 x2``). A measure the runs lack is left empty."""
    optional = ("optimizer_state_bytes", "peak_memory_bytes", "weight_change", "cka_drift")
    board = board.assign(**{c: np.nan for c in optional if c not in board.columns})
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
        optimizer_state_bytes=("optimizer_state_bytes", "max"),
        peak_memory_bytes=("peak_memory_bytes", "max"),
        weight_change_mean=("weight_change", "mean"),
        cka_drift_mean=("cka_drift", "mean"),
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


def reference_strategy(config: Mapping[str, Any]) -> str | None:
    """The strategy the others are compared with: ``report.reference``, or else the one
    strategy of kind ``full`` (None when there is no such single one)."""
    chosen = config.get("report", {}).get("reference", "")
    if chosen:
        return chosen
    fulls = {
        sweeps.family(name)
        for name, spec in config.get("strategies", {}).items()
        if spec.get("kind") == "full"
    }
    return fulls.pop() if len(fulls) == 1 else None


NO_REFERENCE = (
    "No strategy to compare with: set report.reference to one of the strategies (without it, "
    "the reference is the one strategy of kind full, and this experiment has {count})."
)


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


def best_per_shots(
    summary: pd.DataFrame, board: pd.DataFrame, reference: str | None = None
) -> pd.DataFrame:
    """For each shot count, the strategy selected on validation (highest mean best-epoch
    validation macro-F1 over seeds; only fine-tuned strategies have one; ties go to the one
    that trains fewer parameters), its test macro-F1, the run (seed) whose model is the one to
    use, and its paired difference to the ``reference`` strategy across seeds (NaN without
    one). The test split plays no part in the choice."""
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
        versus = paired_difference(board, shots, best["strategy"], reference or "")
        shifted = paired_difference(
            board, shots, best["strategy"], reference or "", "shift_macro_f1"
        )
        rows.append(
            {
                "shots": shots,
                "selected_strategy": best["strategy"],
                "val_macro_f1_mean": best["val_macro_f1_mean"],
                "test_macro_f1_mean": best["test_macro_f1_mean"],
                "test_macro_f1_std": best["test_macro_f1_std"],
                "seeds": int(best["seeds"]),
                "runner_up_on_val": ranked.iloc[1]["strategy"] if len(ranked) > 1 else "",
                "reference": reference or "",
                "diff_vs_reference": versus["diff"],
                "diff_vs_reference_low": versus["low"],
                "diff_vs_reference_high": versus["high"],
                "shift_macro_f1_mean": best["shift_macro_f1_mean"],
                "shift_diff_vs_reference": shifted["diff"],
                "shift_diff_vs_reference_low": shifted["low"],
                "shift_diff_vs_reference_high": shifted["high"],
                "model_seed": int(chosen["seed"]),
                "model_strategy": sweeps.variant(best["strategy"], chosen.get("setting", "")),
            }
        )
    return pd.DataFrame(rows)


def _versus(r: Any, prefix: str = "") -> dict[str, float]:
    """The paired difference of a ``best_per_shots`` row (``prefix`` "shift_": under shift)."""
    diff = getattr(r, f"{prefix}diff_vs_reference")
    return {
        "diff": diff,
        "low": getattr(r, f"{prefix}diff_vs_reference_low"),
        "high": getattr(r, f"{prefix}diff_vs_reference_high"),
        "n": 0 if pd.isna(diff) else r.seeds,
    }


def headline(best: pd.DataFrame) -> list[str]:
    """One sentence per shot count: what was selected on validation and how it did on test,
    against the reference strategy."""
    lines = []
    for r in best.itertuples(index=False):
        if not r.reference:
            compared = "no reference strategy to compare with"
        elif r.selected_strategy == r.reference:
            compared = "it is the reference strategy"
        else:
            compared = f"test macro-F1 minus {r.reference}'s: {interval(_versus(r))}"
        shifted = ""
        if not pd.isna(r.shift_macro_f1_mean):
            shifted = f"; under shift macro-F1 {r.shift_macro_f1_mean:.4f}"
            if r.reference and r.selected_strategy != r.reference:
                shifted += f", minus {r.reference}'s {interval(_versus(r, 'shift_'))}"
        lines.append(
            f"- **{r.shots} shots per class**: **{r.selected_strategy}** selected on validation "
            f"(val macro-F1 {r.val_macro_f1_mean:.4f}); test macro-F1 {r.test_macro_f1_mean:.4f}"
            f"{'' if r.seeds < 2 else f' ± {r.test_macro_f1_std:.4f} (std over {r.seeds} seeds)'}"
            f"; {compared}{shifted}."
        )
    return lines


def megabytes(value: float) -> str:
    return "–" if pd.isna(value) else f"{value / 1e6:,.0f} MB"


def to_markdown(
    board: pd.DataFrame,
    summary: pd.DataFrame,
    experiment: str,
    shift_names: Iterable[str] = (),
    reference: str | None = None,
    full_strategies: int = 0,
    pairs: Sequence[Sequence[str]] = (),
) -> str:
    """The leaderboard page: the strategy selected per shot count, every strategy over seeds
    (:func:`strategy_table`), the ``pairs`` compared (:func:`pair_table`), every run
    (:func:`run_table`). Differences are to ``reference``; without one, the page says so
    (``full_strategies``: how many of kind full there are)."""
    best = best_per_shots(summary, board, reference)
    compared = (
        f"Differences to {reference} are paired by seed, with a 95% t-interval where there "
        "are several seeds."
        if reference
        else NO_REFERENCE.format(count=full_strategies or "none")
    )
    lines = [f"# Leaderboard: {experiment}", "", "## Selected strategy per shot count", ""]
    lines += [
        "Chosen on the validation split (mean best-epoch validation macro-F1 over seeds); the "
        f"test split is only reported. {compared}",
        "",
        *headline(best),
    ]
    lines += ["", "## Every strategy (mean ± std over seeds; n=1: one seed, no spread)", ""]
    lines += strategy_table(board, summary, shift_names, reference)
    if pairs:
        lines += ["", "## Paired comparisons", ""]
        lines += pair_table(board, pairs)
    lines += ["", "## Every run", ""]
    lines += run_table(board)
    return "\n".join(lines) + "\n"


def pair_table(board: pd.DataFrame, pairs: Sequence[Sequence[str]]) -> list[str]:
    """Per shot count and pair [A, B] (``report.pairs``): A's test macro-F1 minus B's, and
    under shift where there are shifted splits, paired by seed (:func:`paired_difference`)."""
    shifted = "shift_macro_f1" in board and board["shift_macro_f1"].notna().any()
    lines = [
        "A minus B, paired by seed, with a 95% t-interval: an interval that holds 0 is no "
        "difference these seeds can tell.",
        "",
        "| shots | A - B | test macro-F1 |" + (" under shift |" if shifted else ""),
        "|---|---|---|" + ("---|" if shifted else ""),
    ]
    order = _shots_order(pd.Series(board["shots"].unique()))
    for shots in board["shots"].unique()[order.argsort().to_numpy()]:
        for a, b in pairs:
            cells = [interval(paired_difference(board, shots, a, b))]
            if shifted:
                cells.append(interval(paired_difference(board, shots, a, b, "shift_macro_f1")))
            lines.append(f"| {shots} | {a} - {b} | " + " | ".join(cells) + " |")
    return lines


def strategy_table(
    board: pd.DataFrame,
    summary: pd.DataFrame,
    shift_names: Iterable[str],
    reference: str | None,
) -> list[str]:
    """One row per (shots, strategy): validation, test and shifted scores, the paired
    difference to ``reference``, what trained and what it cost."""
    shifted = summary["shift_macro_f1_mean"].notna().any()
    swept = (summary["chosen"] != "").any()
    lines = []
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
        "Optimizer state: the most its optimizer held; peak memory: the run's peak (CUDA's "
        "allocator on a GPU, the whole process's resident memory on a CPU). Drift from the "
        "pretrained model: weight change ||w - w0|| / ||w0|| of the body, and 1 - linear CKA "
        "between the pretrained and the fine-tuned body's features on the test split.",
        "",
    ]
    versus = f"vs {reference} (paired) | " if reference else ""
    lines += [
        "| shots | strategy | seeds | val macro-F1 | test macro-F1 | test accuracy | "
        + versus
        + (f"under shift | drop | {versus}" if shifted else "")
        + "trainable | optimizer state | peak memory | train s | weight change | 1 - CKA |"
        + (" chosen |" if swept else ""),
        "|---|---|---:|---:|---:|---:|"
        + ("---|" if reference else "")
        + (("---:|---:|" + ("---|" if reference else "")) if shifted else "")
        + "---:|---:|---:|---:|---:|---:|"
        + ("---|" if swept else ""),
    ]
    for r in summary.itertuples(index=False):
        lines.append(_strategy_row(r, board, reference, shifted, swept))
    return lines


def _drift(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.4f}"


def _spread(std: float, seeds: int) -> str:
    return f" ± {std:.4f}" if seeds > 1 else ""


def _versus_cell(board: pd.DataFrame, r: Any, reference: str, metric: str) -> str:
    if r.strategy == reference:
        return "– | "
    return interval(paired_difference(board, r.shots, r.strategy, reference, metric)) + " | "


def _strategy_row(
    r: Any, board: pd.DataFrame, reference: str | None, shifted: bool, swept: bool
) -> str:
    val = "–" if pd.isna(r.val_macro_f1_mean) else f"{r.val_macro_f1_mean:.4f}"
    versus = _versus_cell(board, r, reference, "test_macro_f1") if reference else ""
    shift_cells = ""
    if shifted and pd.isna(r.shift_macro_f1_mean):
        shift_cells = "– | – | " + ("– | " if reference else "")
    elif shifted:
        shift_cells = (
            f"{r.shift_macro_f1_mean:.4f}{_spread(r.shift_macro_f1_std, r.seeds)} | "
            f"{r.shift_drop_mean:+.4f} | "
            + (_versus_cell(board, r, reference, "shift_macro_f1") if reference else "")
        )
    return (
        f"| {r.shots} | {r.strategy} | {r.seeds} | {val} | {r.test_macro_f1_mean:.4f}"
        f"{_spread(r.test_macro_f1_std, r.seeds)} | {r.test_accuracy_mean:.4f}"
        f"{_spread(r.test_accuracy_std, r.seeds)} | {versus}{shift_cells}"
        f"{percent(r.trainable_fraction)} | {megabytes(r.optimizer_state_bytes)} | "
        f"{megabytes(r.peak_memory_bytes)} | {r.train_seconds_mean:.1f} | "
        f"{_drift(r.weight_change_mean)} | {_drift(r.cka_drift_mean)} |"
        + (f" {r.chosen or '–'} |" if swept else "")
    )


def run_table(board: pd.DataFrame) -> list[str]:
    """One row per run (its swept setting beside its strategy)."""
    lines = [
        "| shots | strategy | seed | test macro-F1 | test accuracy | trainable params | "
        "trainable | train s | best epoch | stopped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in board.itertuples(index=False):
        name = f"{r.strategy} ({r.setting})" if getattr(r, "setting", "") else r.strategy
        lines.append(
            f"| {r.shots} | {name} | {r.seed} | {r.test_macro_f1:.4f} | "
            f"{r.test_accuracy:.4f} | {r.trainable_params:,} | {percent(r.trainable_fraction)} | "
            f"{r.train_seconds:.1f} | {_epoch(r.best_epoch)} | {_epoch(r.stopped_epoch)} |"
        )
    return lines


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
    best: pd.DataFrame,
    run_folders: Mapping[tuple, Path],
    experiment: Mapping[str, str],
    best_effort: bool = True,
) -> dict[str, int]:
    """The selected run of each shot count (its folder's ``mlflow_run_id``) becomes the
    ``champion`` of the registered model ``<experiment>-k<shots>``; returns the versions. In
    the report stage this is best effort: a store that does not answer is told once and
    skipped (the next workflow run registers them, :mod:`adaptune.records`)."""
    uri, registered = experiment["tracking_uri"], {}
    for r in best.itertuples(index=False):
        folder = run_folders[(r.model_strategy, str(r.shots), int(r.model_seed))]
        run_id = (folder / "mlflow_run_id").read_text().strip()
        name = f"{experiment['experiment_name']}-k{r.shots}"
        if not run_id:
            log.warning("%s has no MLflow run yet: %s is registered once it has", folder, name)
            continue
        description = (
            f"{r.selected_strategy}, seed {r.model_seed}: selected on validation (val macro-F1 "
            f"{r.val_macro_f1_mean:.4f}); test macro-F1 {r.test_macro_f1_mean:.4f}"
        )
        try:
            version = tracking.register_champion(uri, name, run_id, description)
        except Exception as err:
            if not best_effort:
                raise
            tracking.tell_store_failed(uri, tracking.failure_text(err))
            break
        if version is not None:
            registered[name] = version
            log.info("registered model %s version %d is now @%s", name, version, tracking.CHAMPION)
    return registered


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
    config = config or {}
    board = select_values(every, config.get("strategies", {}))
    summary = summarise(board)
    reference = reference_strategy(config)
    best = best_per_shots(summary, board, reference)
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
    full_strategies = len(
        {
            sweeps.family(name)
            for name, spec in config.get("strategies", {}).items()
            if spec.get("kind") == "full"
        }
    )
    pairs = config.get("report", {}).get("pairs", [])
    markdown = to_markdown(
        board, summary, experiment, shift_names, reference, full_strategies, pairs
    )
    Path(outputs["markdown"]).write_text(markdown)
    Path(outputs["page"]).write_text(html_page(markdown, best, config))
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
