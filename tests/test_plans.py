import pandas as pd
import pytest

from adaptune.errors import PlanError
from adaptune.plans import Plan, build_plan
from adaptune.settings import StrategySettings


@pytest.fixture
def scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": ["emb.weight", "block.weight", "block.bias", "head.weight", "head.bias"],
            "layer": ["input", "block01", "block01", "head", "head"],
            "layer_index": [0, 1, 1, 2, 2],
            "numel": [100, 50, 5, 10, 2],
            "is_head": [False, False, False, True, True],
        }
    )


def test_full_trains_everything(scores):
    plan = build_plan(scores, "full", StrategySettings(kind="full"))
    assert all(not t.frozen and t.lr_multiplier == 1.0 for t in plan.tensors)
    assert plan.totals == {
        "tensors": 5,
        "trainable_tensors": 5,
        "params": 167,
        "trainable_params": 167,
        "trainable_fraction": 1.0,
    }


def test_head_only_freezes_the_body(scores, tmp_path):
    plan = build_plan(scores, "probe", StrategySettings(kind="head_only"))
    assert [t.name for t in plan.tensors if not t.frozen] == ["head.weight", "head.bias"]
    assert all(t.lr_multiplier == 0.0 for t in plan.tensors if t.frozen)
    assert plan.totals["trainable_fraction"] == pytest.approx(12 / 167)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    summary = plan.to_markdown()
    assert (
        "12 of 167 parameters (7.19%)" in summary and "| input | 1 | 100 | 0 | frozen |" in summary
    )


def test_head_only_needs_a_head(scores):
    with pytest.raises(PlanError, match="no tensor as the head"):
        build_plan(scores.assign(is_head=False), "h", StrategySettings(kind="head_only"))


def test_loading_something_else_is_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"strategy": "x"}')
    with pytest.raises(PlanError, match="is not a freeze plan"):
        Plan.load(tmp_path / "x.json")
