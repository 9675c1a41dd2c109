import json

import pandas as pd
import pytest

from adaptune.report import leaderboard, run_report, summarise


def write_run(folder, strategy, shots, seed, f1):
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
                "best_val_macro_f1": f1,
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
        ]
    }
    run_report([str(f) for f in files], "exp", outputs)
    assert "| 16 | full | 2 | 0.8500 ± 0.0707 |" in (tmp_path / "lb.md").read_text()
    assert len(pd.read_csv(outputs["leaderboard"])) == 5
    assert (tmp_path / "lb.png").stat().st_size > 10_000
    assert (tmp_path / "t.png").stat().st_size > 10_000
    best = pd.read_csv(outputs["best"], dtype={"shots": str}).set_index("shots")
    assert best.loc["16", "best_strategy"] == "full"
    assert best.loc["16", "margin_over_runner_up"] == pytest.approx(0.15)
    assert best.loc["16", "margin_over_full"] == 0
