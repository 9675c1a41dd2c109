import json

import pandas as pd
import pytest

from adaptune.errors import ConfigError
from adaptune.experiment import check_pairs, check_reference
from adaptune.report import (
    best_per_shots,
    interval,
    leaderboard,
    paired_difference,
    reference_strategy,
    run_report,
    summarise,
    to_markdown,
)


def write_run(folder, strategy, shots, seed, f1, val=None):
    path = folder / f"{strategy}-{shots}-{seed}.json"
    path.write_text(
        json.dumps(
            {
                "strategy": strategy,
                "shots": shots,
                "seed": seed,
                "test_accuracy": f1 + 0.01,
                "test_macro_f1": f1,
                "trainable_params": 10,
                "trainable_fraction": 0.5,
                "train_seconds": 1.5,
                "best_epoch": 2,
                "best_val_macro_f1": f1 if val is None else val,
                "test_loss": 0.3,
                "test_examples": 100,
                "mlflow_run_id": "abc",
                "per_class": {},
            }
        )
    )
    return path


def test_leaderboard_and_summary_over_seeds(tmp_path):
    files = [
        write_run(tmp_path, "full", "16", 0, 0.80),
        write_run(tmp_path, "full", "16", 1, 0.90),
        write_run(tmp_path, "head_only", "16", 0, 0.70),
        write_run(tmp_path, "full", "all", 0, 0.95),
        write_run(tmp_path, "full", "4", 0, 0.60),
    ]
    board = leaderboard(files)
    assert list(board["shots"]) == ["4", "16", "16", "16", "all"]
    assert list(board.loc[board["shots"] == "16", "test_macro_f1"]) == [0.90, 0.80, 0.70]
    summary = summarise(board).set_index(["shots", "strategy"])
    assert summary.loc[("16", "full"), "test_macro_f1_mean"] == pytest.approx(0.85)
    assert summary.loc[("16", "full"), "test_macro_f1_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert summary.loc[("16", "head_only"), "seeds"] == 1

    outputs = {
        k: str(tmp_path / n)
        for k, n in [
            ("leaderboard", "lb.csv"),
            ("summary", "s.csv"),
            ("markdown", "lb.md"),
            ("plot", "lb.png"),
            ("tradeoffs", "t.png"),
            ("best", "b.csv"),
            ("page", "lb.html"),
            ("curves", "c.png"),
        ]
    }
    run_report([str(f) for f in files], "exp", outputs)
    assert "| 16 | full | 2 | 0.8500 | 0.8500 ± 0.0707 |" in (tmp_path / "lb.md").read_text()
    assert "<table>" in (tmp_path / "lb.html").read_text()
    assert len(pd.read_csv(outputs["leaderboard"])) == 5
    assert (tmp_path / "lb.png").stat().st_size > 10_000
    assert (tmp_path / "t.png").stat().st_size > 10_000
    best = pd.read_csv(outputs["best"], dtype={"shots": str}).set_index("shots")
    assert best.loc["16", "selected_strategy"] == "full"
    assert best.loc["16", "model_seed"] == 1  # the seed with the better validation score


def test_the_strategy_is_selected_on_validation_and_compared_with_full_by_seed(tmp_path):
    """head_only wins on validation but loses on test: it is selected (the test split plays
    no part), and its paired difference to full comes with an interval over the 3 seeds."""
    files = [
        write_run(tmp_path, "full", "8", s, f1, val=0.5) for s, f1 in enumerate([0.8, 0.7, 0.9])
    ]
    files += [
        write_run(tmp_path, "head_only", "8", s, f1, val=0.6)
        for s, f1 in enumerate([0.75, 0.66, 0.86])
    ]
    board = leaderboard(files)
    best = best_per_shots(summarise(board), board, "full").set_index("shots")
    assert best.loc["8", "selected_strategy"] == "head_only"
    assert best.loc["8", "test_macro_f1_mean"] == pytest.approx(0.7566667)
    # differences -0.05, -0.04, -0.04: mean -0.04333, t(2) interval 4.303 * 0.005774 / sqrt(3)
    assert best.loc["8", "diff_vs_reference"] == pytest.approx(-0.0433333)
    half = 4.302653 * 0.0057735 / 3**0.5
    assert best.loc["8", "diff_vs_reference_low"] == pytest.approx(-0.0433333 - half, rel=1e-4)
    one_seed = paired_difference(board[board["seed"] == 0], "8", "head_only", "full")
    assert one_seed["n"] == 1 and "n=1, no interval" in interval(one_seed)


def test_the_reference_is_a_setting_not_a_name(tmp_path):
    """A full fine-tuning strategy called full_ft is the reference (the one of kind full);
    report.reference picks another; with two of kind full and none named, the page says so in
    words instead of a column of dashes; a reference that is not a strategy stops the config."""
    files = [
        write_run(tmp_path, name, "8", s, f1 + bonus, val=0.5 + bonus)
        for name, bonus in (("full_ft", 0.0), ("head_only", 0.05), ("full_big", -0.1))
        for s, f1 in enumerate([0.8, 0.7, 0.9])
    ]
    board = leaderboard(files)
    summary = summarise(board)
    strategies = {"full_ft": {"kind": "full"}, "head_only": {"kind": "head_only"}}
    assert reference_strategy({"strategies": strategies}) == "full_ft"
    page = to_markdown(board, summary, "exp", reference="full_ft")
    assert "| vs full_ft (paired) |" in page
    assert "test macro-F1 minus full_ft's: +0.0500 [+0.0500, +0.0500], n=3" in page
    chosen = {"strategies": strategies, "report": {"reference": "head_only"}}
    assert reference_strategy(chosen) == "head_only"
    both = {**strategies, "full_big": {"kind": "full"}}
    assert reference_strategy({"strategies": both}) is None
    page = to_markdown(board, summary, "exp", reference=None, full_strategies=2)
    assert "No strategy to compare with: set report.reference" in page
    assert "vs " not in page and "no reference strategy to compare with" in page
    # more pairs than the reference's, each paired by seed (head_only is 0.05 above full_ft
    # in every seed, full_big 0.1 below)
    page = to_markdown(board, summary, "exp", "full_ft", pairs=[["head_only", "full_big"]])
    assert "| 8 | head_only - full_big | +0.1500 [+0.1500, +0.1500], n=3 |" in page
    check_pairs([["head_only", "full_ft"]], {"full_ft@lr=0.001": {}, "head_only": {}})
    with pytest.raises(ConfigError, match=r"report\.pairs\[0\] = 'lisa' is not a strategy"):
        check_pairs([["head_only", "lisa"]], strategies)
    with pytest.raises(ConfigError, match=r"report\.pairs\[1\] compares 'full_ft' with itself"):
        check_pairs([["head_only", "full_ft"], ["full_ft", "full_ft"]], strategies)
    check_reference("full_ft", {"full_ft@lr=0.001": {}, "head_only": {}})  # a swept one
    with pytest.raises(ConfigError, match=r"report\.reference = 'full'.*full_ft, head_only"):
        check_reference("full", strategies)
