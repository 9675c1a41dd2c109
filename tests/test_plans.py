import pandas as pd
import pytest

from adaptune import strategies
from adaptune.errors import ConfigError, PlanError
from adaptune.importance import layer_table
from adaptune.plans import Plan, ScoreTables


def build_plan(scores: pd.DataFrame, name: str, spec: dict) -> Plan:
    """A plan from a score table and its layer table, as score_importance writes them."""
    return strategies.build_plan(ScoreTables(scores, layer_table(scores)), name, spec)


@pytest.fixture
def scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": ["emb.weight", "block.weight", "block.bias", "head.weight", "head.bias"],
            "layer": ["input", "block01", "block01", "head", "head"],
            "layer_index": [0, 1, 1, 2, 2],
            "layer_kind": ["input", "block", "block", "head", "head"],
            "module": ["", "block", "block", "", ""],
            "numel": [100, 50, 5, 10, 2],
            "is_head": [False, False, False, True, True],
        }
    )


def test_full_trains_everything(scores):
    plan = build_plan(scores, "full", {"kind": "full"})
    assert all(not t.frozen and t.lr_multiplier == 1.0 for t in plan.tensors)
    assert plan.totals == {
        "tensors": 5,
        "trainable_tensors": 5,
        "params": 167,
        "trainable_params": 167,
        "trainable_fraction": 1.0,
        "scheduled_tensors": 0,
    }


def test_head_only_freezes_the_body(scores, tmp_path):
    plan = build_plan(scores, "probe", {"kind": "head_only"})
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
        build_plan(scores.assign(is_head=False), "h", {"kind": "head_only"})


def test_loading_something_else_is_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"strategy": "x"}')
    with pytest.raises(PlanError, match="is not a freeze plan"):
        Plan.load(tmp_path / "x.json")


@pytest.fixture
def scored() -> pd.DataFrame:
    """A model of four layers with known scores: input, two blocks, head."""
    return pd.DataFrame(
        {
            "name": ["emb.w", "b1.w", "b1.b", "b2.w", "b2.b", "head.w", "head.b"],
            "layer": ["input", "block01", "block01", "block02", "block02", "head", "head"],
            "layer_index": [0, 1, 1, 2, 2, 3, 3],
            "layer_kind": ["input", "block", "block", "block", "block", "head", "head"],
            "module": ["", "b1", "b1", "b2", "b2", "", ""],
            "numel": [600, 200, 10, 200, 10, 30, 3],
            "is_head": [False, False, False, False, False, True, True],
            "fisher": [6.0, 8.0, 0.1, 40.0, 0.5, 9.0, 0.3],
        }
    ).assign(fisher_per_element=lambda t: t["fisher"] / t["numel"])


def plan(scores, **spec):
    return build_plan(scores, "s", spec)


def trained(p):
    return [t.name for t in p.tensors if not t.frozen]


def test_freeze_bottom(scored):
    assert trained(plan(scored, kind="freeze_bottom", layers=1)) == [
        "b2.w",
        "b2.b",
        "head.w",
        "head.b",
    ]
    assert trained(plan(scored, kind="freeze_bottom", layers=0))[0] == "b1.w"
    with pytest.raises(PlanError, match="layers = 3, but the model has 2 blocks"):
        plan(scored, kind="freeze_bottom", layers=3)


def test_llrd_decays_from_the_head(scored):
    multipliers = {t.name: t.lr_multiplier for t in plan(scored, kind="llrd", decay=0.5).tensors}
    assert multipliers == {
        "emb.w": 0.125,
        "b1.w": 0.25,
        "b1.b": 0.25,
        "b2.w": 0.5,
        "b2.b": 0.5,
        "head.w": 1.0,
        "head.b": 1.0,
    }


def test_importance_freezes_the_least_important_layers_by_fraction(scored):
    # per element: input 0.01, block01 8.1/210 = 0.039, block02 40.5/210 = 0.19
    p = plan(scored, kind="importance", metric="fisher", freeze={"fraction": 0.5})
    assert trained(p) == ["b1.w", "b1.b", "b2.w", "b2.b", "head.w", "head.b"]
    protect = plan(
        scored, kind="importance", metric="fisher", freeze={"fraction": 0.2, "protect": True}
    )
    assert trained(protect) == ["emb.w", "b1.w", "b1.b", "head.w", "head.b"]
    assert "fisher" in protect.tensors[3].reason and "most important" in protect.tensors[3].reason


def test_importance_threshold_on_ranks_per_tensor(scored):
    p = plan(
        scored, kind="importance", metric="fisher", granularity="tensor", freeze={"threshold": 0.5}
    )
    # body per element: emb .01, b1.w .04, b1.b .01, b2.w .2, b2.b .05 -> ranks .3 .6 .3 1 .8
    assert trained(p) == ["b1.w", "b2.w", "b2.b", "head.w", "head.b"]


def test_budget_keeps_the_most_importance_that_fits(scored):
    total = scored["numel"].sum()  # 1,053
    p = plan(
        scored,
        kind="importance",
        metric="fisher",
        granularity="tensor",
        freeze={"budget": 250 / total},
    )
    assert p.totals["trainable_params"] <= 250
    assert trained(p) == ["b2.w", "b2.b", "head.w", "head.b"]  # 243 params
    # Exhaustive check: no other choice of body tensors under the budget keeps more importance.
    from itertools import combinations

    body = scored[~scored["is_head"]].set_index("name")
    value = body["fisher_per_element"] * body["numel"]
    kept = value[["b2.w", "b2.b"]].sum()
    capacity = 250 - 33
    for size in range(1, len(body) + 1):
        for subset in combinations(body.index, size):
            if body.loc[list(subset), "numel"].sum() <= capacity:
                assert value[list(subset)].sum() <= kept + 1e-12
    with pytest.raises(PlanError, match="the new head alone has 33"):
        plan(scored, kind="importance", metric="fisher", freeze={"budget": 0.01})


@pytest.mark.parametrize("mapping", ["linear", "log", "power", "sigmoid", "rank"])
def test_lr_mappings_are_monotonic_and_in_range(scored, mapping):
    p = plan(
        scored,
        kind="importance",
        metric="fisher",
        granularity="tensor",
        lr={"mapping": mapping, "min": 0.2, "max": 2.0},
    )
    body = [t for t in p.tensors if not t.name.startswith("head")]
    score = dict(zip(scored["name"], scored["fisher_per_element"], strict=True))
    ordered = sorted(body, key=lambda t: score[t.name])
    multipliers = [t.lr_multiplier for t in ordered]
    assert multipliers == sorted(multipliers)
    assert all(0.2 - 1e-12 <= m <= 2.0 + 1e-12 for m in multipliers)
    assert {t.lr_multiplier for t in p.tensors if t.name.startswith("head")} == {2.0}
    inverse = plan(
        scored,
        kind="importance",
        metric="fisher",
        granularity="tensor",
        lr={"mapping": mapping, "inverse": True},
    )
    by_name = {t.name: t.lr_multiplier for t in inverse.tensors}
    assert [by_name[t.name] for t in ordered] == sorted(by_name[t.name] for t in ordered)[::-1]


def test_freeze_and_lr_combine(scored):
    p = plan(
        scored,
        kind="importance",
        metric="fisher",
        freeze={"fraction": 0.5},
        lr={"mapping": "linear", "min": 0.5, "max": 1.0},
    )
    multipliers = {t.layer: t.lr_multiplier for t in p.tensors}
    assert multipliers == {"input": 0.0, "block01": 0.5, "block02": 1.0, "head": 1.0}


def test_missing_metric_and_bad_rules_are_named(scored):
    with pytest.raises(PlanError, match="'hessian_trace' is not in the importance scores"):
        plan(scored, kind="importance", metric="hessian_trace", freeze={"fraction": 0.5})
    with pytest.raises(ConfigError, match="exactly one of fraction, threshold, budget"):
        plan(scored, kind="importance", freeze={"fraction": 0.5, "budget": 0.1})
    with pytest.raises(ConfigError, match="needs a freeze rule, an lr rule, or both"):
        plan(scored, kind="importance")
    with pytest.raises(ConfigError, match=r"strategies\.s\.freeze\.fraction = 2"):
        plan(scored, kind="importance", freeze={"fraction": 2})


def test_plan_png(scored, tmp_path):
    from adaptune.figures import plot_plan

    plot_plan(
        plan(
            scored,
            kind="importance",
            metric="fisher",
            freeze={"fraction": 0.5},
            lr={"mapping": "rank"},
        ),
        tmp_path / "p.png",
    )
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_gradual_unfreezing_thaws_from_the_top(scored):
    p = plan(scored, kind="gradual_unfreeze", every=2)
    start = {t.layer: t.unfreeze_epoch for t in p.tensors}
    assert start == {"head": 1, "block02": 3, "block01": 5, "input": 7}
    assert p.totals["trainable_fraction"] == 1.0 and p.totals["scheduled_tensors"] == 5


def test_gradual_unfreezing_by_importance(scored):
    # per-element Fisher by layer: block02 0.19 > block01 0.039 > input 0.01
    p = plan(scored, kind="gradual_unfreeze", order="importance", metric="fisher")
    order = sorted({(t.unfreeze_epoch, t.layer) for t in p.tensors})
    assert [layer for _, layer in order] == ["head", "block02", "block01", "input"]


def test_fastai_fine_tune(scored):
    p = plan(scored, kind="fastai_fine_tune", frozen_epochs=1, min_multiplier=0.01)
    by_layer = {t.layer: (t.unfreeze_epoch, t.lr_multiplier) for t in p.tensors}
    assert by_layer["head"] == (1, 1.0)
    assert by_layer["input"] == (2, pytest.approx(0.01))
    assert by_layer["block01"] == (2, pytest.approx(0.01 ** (2 / 3)))


def test_dynamic_strategies_train_everything_and_say_why(scored):
    rgn = plan(scored, kind="auto_rgn")
    child = plan(scored, kind="childtuning_d", p=0.2)
    assert rgn.totals["trainable_fraction"] == child.totals["trainable_fraction"] == 1.0
    assert "||g||/||w||" in rgn.tensors[0].reason and "top 20%" in child.tensors[0].reason
    head = [t for t in rgn.tensors if t.is_head]
    assert [t.name for t in head] == ["head.w", "head.b"]
    assert all("base rate" in t.reason for t in head)
    assert child.settings["p"] == 0.2


def test_lora_plan_freezes_the_body(scored):
    p = plan(scored, kind="lora", r=4)
    assert trained(p) == ["head.w", "head.b"]
    assert p.settings["r"] == 4 and "rank-4 adapters" in p.tensors[0].reason
    assert p.settings == {"r": 4, "alpha": 16, "dropout": 0.1, "targets": []}


def test_lp_ft_probes_the_head_then_thaws_everything(scored):
    p = plan(scored, kind="lp_ft", probe_epochs=3)
    start = {t.layer: t.unfreeze_epoch for t in p.tensors}
    assert start == {"head": 1, "block02": 4, "block01": 4, "input": 4}
    assert {t.lr_multiplier for t in p.tensors} == {1.0} and not any(t.frozen for t in p.tensors)
    assert p.settings == {"probe_epochs": 3, "probe_lr": 0.01}


def test_combined_layer_plans_rank_layers_as_score_importance_weighted_them(scored):
    """``importance.combine`` weighs the metrics of ``combined``: a layer plan must follow the
    weighted ranks that ``layers.parquet`` holds, not an equal-weight recomputation."""
    from adaptune.importance import COMBINED

    table = scored.assign(
        grad_norm=[100.0, 1.0, 1.0, 0.1, 0.1, 5.0, 5.0],
    ).assign(grad_norm_per_element=lambda t: t["grad_norm"] / t["numel"])
    for metric in ("fisher", "grad_norm"):
        table[f"{metric}_rank"] = table[f"{metric}_per_element"].rank(pct=True)
    table[COMBINED] = (table["fisher_rank"] + table["grad_norm_rank"]) / 2
    table[f"{COMBINED}_per_element"] = table[COMBINED]
    weighted = layer_table(table, {"fisher": 1.0})
    equal = layer_table(table)
    body = weighted["layer_kind"] != "head"
    assert (
        weighted[body].sort_values("combined")["layer"].tolist()
        != equal[body].sort_values("combined")["layer"].tolist()
    )
    spec = {"kind": "importance", "metric": COMBINED, "freeze": {"fraction": 0.4}}
    frozen = {
        t.layer
        for t in strategies.build_plan(ScoreTables(table, weighted), "s", spec).tensors
        if t.frozen
    }
    least = weighted[body].sort_values("combined")["layer"].iloc[0]
    assert frozen == {least}
