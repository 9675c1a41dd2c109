"""The strategy kinds of today's fine-tuning methods (LISA, importance-sampled LISA, BAdam,
sparse masks, HFT, progressive freezing), each checked for what it promises on the real
optimizer after real steps of the tiny BERT; their schedules as the plan lists them; one
switching kind under DDP (two Gloo processes); and every kind on a tiny decoder (GPT-2) and a
tiny ViT."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from adaptune import distributed, strategies, training
from adaptune.errors import PlanError
from adaptune.importance import calibration_batches, layer_table, score_model
from adaptune.layers import tensor_categories
from adaptune.plans import Plan, ScoreTables
from adaptune.settings import TrainSettings
from adaptune.strategies import _switching, badam, lisa, sparse_mask
from adaptune.strategies.lisa_importance import block_probabilities

from .conftest import tiny_task
from .test_distributed import without_dropout, workers  # noqa: F401  (a fixture)
from .test_training import frame

LABELS = ["a", "b", "c"]
CPU = torch.device("cpu")


def settings(**values: Any) -> TrainSettings:
    return TrainSettings.from_config(values)


@pytest.fixture(scope="module")
def bert_tables(tiny_bert_dir) -> ScoreTables:
    """The tiny BERT's importance scores on the training frames, as score_importance makes
    them."""
    task = tiny_task(tiny_bert_dir, LABELS)
    batches = calibration_batches(task.modality, frame(16, 0), 2, 8, seed=0)
    scores, _ = score_model(task, batches, ["grad_norm", "fisher", "depth", "combined"], probes=2)
    return ScoreTables(scores, layer_table(scores))


def block_names(model: nn.Module, layer: str, plan: Plan) -> list[str]:
    return [t.name for t in plan.tensors if t.layer == layer]


class StepWatch:
    """After every optimizer step of a run: which tensors could train (``requires_grad``),
    which have optimizer state (by name), the state's step counts, and which weights moved."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hooks: type, model: nn.Module) -> None:
        self.model = model
        self.steps: list[dict[str, Any]] = []
        self.before = self.snapshot()
        original = hooks.after_step

        def after_step(hook_self: Any, step: int) -> None:
            original(hook_self, step)
            names = {id(p): n for n, p in model.named_parameters()}
            state = hook_self.optimizer.state if hasattr(hook_self, "optimizer") else {}
            now = self.snapshot()
            self.steps.append(
                {
                    "step": step,
                    "training": {n for n, p in model.named_parameters() if p.requires_grad},
                    "state": {names[id(t)] for t in state if len(state[t])},
                    "counts": {names[id(t)]: float(s["step"]) for t, s in state.items() if s},
                    "moved": {n for n in now if not torch.equal(now[n], self.before[n])},
                }
            )
            self.before = now

        monkeypatch.setattr(hooks, "after_step", after_step)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


# --- LISA ---------------------------------------------------------------------------------


def test_lisa_switches_every_k_steps_as_the_plan_lists_and_always_trains_the_head(
    tiny_bert_dir, bert_tables, monkeypatch
):
    spec = {"kind": "lisa", "layers": 1, "interval_steps": 2, "seed": 3}
    train = settings(optimizer="adamw", lr=1e-3, weight_decay=0.1, epochs=3, batch_size=4)
    plan = strategies.build_plan(bert_tables, "lisa", spec, train)
    assert plan.totals["trainable_fraction"] == 1.0  # the union; the schedule says when
    periods = plan.schedule["periods"]
    assert len(periods) == _switching.LISTED_PERIODS and all(len(p) == 1 for p in periods)
    assert {"block01", "block02"} == {b for p in periods[:6] for b in p}  # both drawn early
    assert "| 0 | " + periods[0][0] + " |" in plan.to_markdown()
    task = tiny_task(tiny_bert_dir, LABELS)
    watch = StepWatch(monkeypatch, lisa.LisaHooks, task.model)
    result = training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, CPU)
    always = {t.name for t in plan.tensors if t.layer not in ("block01", "block02")}
    assert len(watch.steps) == 12  # 16 examples in batches of 4, 3 epochs
    for row in watch.steps:
        active = periods[row["step"] // 2][0]
        expected = always | set(block_names(task.model, active, plan))
        assert row["training"] == expected, row["step"]
        # drop: the optimizer holds state for what trains now, nothing else
        assert row["state"] == expected, row["step"]
        # the other block did not move, weight decay included
        other = "block01" if active == "block02" else "block02"
        assert not row["moved"] & set(block_names(task.model, other, plan)), row["step"]
        assert {"classifier.weight", "classifier.bias"} <= row["moved"]
    switches = [s for s in range(2, 12, 2) if periods[s // 2] != periods[s // 2 - 1]]
    assert switches, "the schedule never changed the active block"
    for step in switches:  # a block drawn again starts its Adam state afresh
        name = block_names(task.model, periods[step // 2][0], plan)[0]
        assert watch.steps[step]["counts"][name] == 1.0
    record = result.strategy_record
    assert record["interval_steps"] == 2
    assert [p["blocks"] for p in record["periods"]] == periods[:6]
    assert record["most_params_at_once"] == plan.totals["params"] - 8544  # one block of two


def test_lisa_keeps_the_state_of_a_resting_block_when_told(tiny_bert_dir, bert_tables, monkeypatch):
    spec = {"kind": "lisa", "layers": 1, "interval_steps": 2, "optimizer_state": "keep", "seed": 3}
    train = settings(optimizer="adamw", lr=1e-3, epochs=2, batch_size=4)
    plan = strategies.build_plan(bert_tables, "lisa", spec, train)
    task = tiny_task(tiny_bert_dir, LABELS)
    watch = StepWatch(monkeypatch, lisa.LisaHooks, task.model)
    training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, CPU)
    drawn: set[str] = set()
    for row in watch.steps:
        drawn |= set(block_names(task.model, plan.schedule["periods"][row["step"] // 2][0], plan))
        assert drawn <= row["state"]  # every block drawn so far keeps its state


def test_lisa_interval_as_a_fraction_lists_every_period_of_the_run(bert_tables):
    plan = strategies.build_plan(bert_tables, "lisa", {"kind": "lisa", "interval_fraction": 0.15})
    assert len(plan.schedule["periods"]) == 7  # ceil(1 / 0.15)
    for total in (12, 20, 37, 50):
        k = _switching.interval_steps(plan.schedule, total)
        assert k == math.ceil(0.15 * total) and math.ceil(total / k) <= 7
    with pytest.raises(PlanError, match="layers = 3, but the model has 2 blocks"):
        strategies.build_plan(bert_tables, "lisa", {"kind": "lisa", "layers": 3})


# --- importance-sampled LISA ---------------------------------------------------------------


def test_importance_probabilities_follow_the_scores_with_a_floor():
    scores = np.array([1.0, 3.0, 0.0, 4.0])
    p = block_probabilities(scores, temperature=1.0, floor=0.2)
    assert p == pytest.approx(0.2 / 4 + 0.8 * scores / 8)
    assert p.sum() == pytest.approx(1.0) and p.min() == pytest.approx(0.05)  # zero score: floor
    assert block_probabilities(scores, 1.0, 1.0) == pytest.approx([0.25] * 4)  # uniform LISA
    sharp = block_probabilities(scores, 0.5, 0.2)  # squares: 1, 9, 0, 16 of 26
    assert sharp == pytest.approx(0.05 + 0.8 * np.array([1, 9, 0, 16]) / 26)
    flat = block_probabilities(scores, 100.0, 0.2)
    assert np.ptp(flat[[0, 1, 3]]) < 0.01


def synthetic_tables(block_scores: list[float]) -> ScoreTables:
    """An input layer, blocks with these Fisher scores per parameter, and a head."""
    names = ["emb.w", *[f"b{i}.w" for i in range(len(block_scores))], "head.w"]
    kinds = ["input", *["block"] * len(block_scores), "head"]
    layers = ["input", *[f"block{i + 1:02d}" for i in range(len(block_scores))], "head"]
    scores = pd.DataFrame(
        {
            "name": names,
            "layer": layers,
            "layer_index": list(range(len(names))),
            "layer_kind": kinds,
            "module": [""] * len(names),
            "numel": [100] * len(names),
            "is_head": [k == "head" for k in kinds],
            "fisher": [50.0, *[100 * s for s in block_scores], 50.0],
        }
    )
    return ScoreTables(scores, layer_table(scores))


def test_importance_sampled_lisa_draws_important_blocks_more_often_and_lists_them():
    tables = synthetic_tables([0.1, 0.1, 0.9, 0.1])
    spec = {
        "kind": "lisa_importance",
        "metric": "fisher",
        "layers": 1,
        "interval_fraction": 0.002,
        "floor": 0.2,
    }
    plan = strategies.build_plan(tables, "isl", spec)
    blocks = plan.schedule["blocks"]
    probabilities = [b["probability"] for b in blocks]
    assert probabilities == pytest.approx(0.05 + 0.8 * np.array([1, 1, 9, 1]) / 12)
    assert [b["score"] for b in blocks] == pytest.approx([0.1, 0.1, 0.9, 0.1])
    periods = plan.schedule["periods"]
    assert len(periods) == 500
    share = np.mean([p == ["block03"] for p in periods])
    assert share == pytest.approx(probabilities[2], abs=0.05)  # 0.65 of 500 draws
    markdown = plan.to_markdown()
    assert "| block03 | 100 | 0.650 |" in markdown
    # the same seed draws the same periods; uniform LISA with that seed draws others
    assert strategies.build_plan(tables, "isl", spec).schedule["periods"] == periods
    same = {k: v for k, v in spec.items() if k not in ("metric", "floor")}
    uniform = strategies.build_plan(tables, "u", {**same, "kind": "lisa"}).schedule["periods"]
    assert np.mean([p == ["block03"] for p in uniform]) == pytest.approx(0.25, abs=0.06)


# --- BAdam --------------------------------------------------------------------------------


def test_badam_holds_optimizer_state_for_the_active_block_alone(
    tiny_bert_dir, bert_tables, monkeypatch
):
    spec = {"kind": "badam", "interval_steps": 3}
    train = settings(optimizer="adamw", lr=1e-3, weight_decay=0.1, epochs=3, batch_size=4)
    plan = strategies.build_plan(bert_tables, "badam", spec, train)
    frozen = {t.name for t in plan.tensors if t.frozen}
    assert frozen == {t.name for t in plan.tensors if t.layer in ("input", "output")}
    assert plan.schedule["periods"][:4] == [["block02"], ["block01"], ["block02"], ["block01"]]
    task = tiny_task(tiny_bert_dir, LABELS)
    watch = StepWatch(monkeypatch, badam.BadamHooks, task.model)
    training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, CPU)
    head = {"classifier.weight", "classifier.bias"}
    for row in watch.steps:
        active = set(block_names(task.model, ["block02", "block01"][row["step"] // 3 % 2], plan))
        assert row["state"] == active | head, row["step"]
        assert row["moved"] <= active | head and head <= row["moved"]
        # the state starts afresh at every switch, the head's too (BAdam clears it all)
        assert row["counts"]["classifier.weight"] == row["step"] % 3 + 1
    assert plan.memory["optimizer_state"] < 0.01 * plan.memory["weights"] * 2  # one block, head


def test_badam_orders(bert_tables):
    def periods(**spec: Any) -> list[list[str]]:
        plan = strategies.build_plan(bert_tables, "b", {"kind": "badam", **spec})
        return plan.schedule["periods"]

    assert periods(order="ascending")[:3] == [["block01"], ["block02"], ["block01"]]
    # the plan lists the cycle's blocks and their share of the periods, no draw probability
    markdown = strategies.build_plan(bert_tables, "b", {"kind": "badam"}).to_markdown()
    assert "| block | params | periods active (of the listed) |" in markdown
    assert "probability" not in markdown
    with_ends = periods(order="ascending", include_input_output=True)
    assert with_ends[:5] == [["input"], ["block01"], ["block02"], ["output"], ["input"]]
    shuffled = periods(order="random", seed=1, interval_fraction=0.1)
    assert len(shuffled) == 10
    for start in range(0, 10, 2):  # every round is a permutation of the two blocks
        assert sorted(b for p in shuffled[start : start + 2] for b in p) == ["block01", "block02"]


# --- sparse masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["tensor", "body", "row"])
def test_sparse_mask_leaves_untouched_entries_bit_identical(tiny_bert_dir, bert_tables, scope):
    spec = {"kind": "sparse_mask", "density": 0.1, "scope": scope}
    plan = strategies.build_plan(bert_tables, "mask", spec)
    task = tiny_task(tiny_bert_dir, LABELS)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    # AdamW with a large weight decay: without writing masked entries back they would move
    train = settings(optimizer="adamw", lr=1e-2, weight_decay=0.5, epochs=2, batch_size=4)
    result = training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, CPU)
    record = result.strategy_record
    body = [n for n in before if not n.startswith("classifier")]
    changed = {n: before[n] != p.detach() for n, p in task.model.named_parameters()}
    moved = sum(int(changed[n].sum()) for n in body)
    assert 0 < moved <= record["body_weights_updated"]
    assert result.trainable_params == record["body_weights_updated"] + 99  # the head: 32x3+3
    assert record["body_weights"] == sum(before[n].numel() for n in body)
    for name in body:
        assert record["density_per_tensor"][name] >= changed[name].float().mean() - 1e-9
    if scope == "tensor":  # every tensor with enough nonzero gradients keeps its share exactly
        query = "bert.encoder.layer.0.attention.self.query.weight"
        assert record["density_per_tensor"][query] == pytest.approx(round(0.1 * 1024) / 1024)
    if scope == "row":  # each output row of a matrix keeps round(0.1 x 32) = 3 entries
        kept = record["density_per_tensor"]["bert.encoder.layer.1.intermediate.dense.weight"]
        assert kept == pytest.approx(3 / 32)
    assert all(changed[n].any() for n in ("classifier.weight", "classifier.bias"))


def test_sparse_mask_under_bf16_weights_keeps_masked_entries_and_their_masters(
    tiny_bert_dir, bert_tables, monkeypatch
):
    plan = strategies.build_plan(bert_tables, "m", {"kind": "sparse_mask", "density": 0.2})
    task = tiny_task(tiny_bert_dir, LABELS)
    seen: dict[str, Any] = {}
    original = sparse_mask.SparseMaskHooks.after_step

    def after_step(self: Any, step: int) -> None:
        original(self, step)
        seen["entries"] = self.entries

    monkeypatch.setattr(sparse_mask.SparseMaskHooks, "after_step", after_step)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    train = settings(
        optimizer="adamw",
        lr=1e-2,
        weight_decay=0.5,
        epochs=1,
        batch_size=8,
        weight_precision="bf16",
        precision="bf16",
    )
    training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, CPU)
    names = {id(p): n for n, p in task.model.named_parameters()}
    for param, master, mask, _ in seen["entries"]:
        assert master is not param and master.dtype == torch.float32
        # the weight the run started from, in bf16 (saved in fp32 after the run)
        original = before[names[id(param)]].bfloat16().float()
        assert torch.equal(param.detach()[~mask], original[~mask])
        assert torch.equal(master.detach()[~mask], original[~mask])
        assert not mask.any() or not torch.equal(param.detach(), original)


def test_sparse_mask_choice_is_exact(monkeypatch):
    magnitudes = {
        "a": torch.tensor([[3.0, 0.0, 1.0], [2.0, 5.0, 0.5]]),
        "b": torch.tensor([4.0, 0.0]),
    }
    masks = sparse_mask.choose_masks(magnitudes, 0.5, "body")  # top 4 of 8: 5, 4, 3, 2
    assert masks["a"].tolist() == [[True, False, False], [True, True, False]]
    assert masks["b"].tolist() == [True, False]
    rows = sparse_mask.choose_masks(magnitudes, 0.34, "row")  # one per row of a; b: one of two
    assert rows["a"].tolist() == [[True, False, False], [False, True, False]]
    assert rows["b"].tolist() == [True, False]
    # a zero gradient is never kept, even where the density would reach it
    assert sparse_mask.choose_masks({"c": torch.tensor([1.0, 0.0])}, 1.0, "tensor")[
        "c"
    ].tolist() == [True, False]


# --- HFT ----------------------------------------------------------------------------------


def test_hft_freezes_exactly_half_of_each_category_seeded(tiny_bert_dir, bert_tables):
    plan = strategies.build_plan(bert_tables, "hft", {"kind": "hft", "seed": 0})
    scores = bert_tables.tensors.set_index("name")

    def unit(name: str) -> str:
        return name.rpartition(".")[0]

    frozen_units = {unit(t.name) for t in plan.tensors if t.frozen}
    assert not any(t.frozen for t in plan.tensors if t.is_head)
    # a module is frozen whole or not at all
    for t in plan.tensors:
        assert t.frozen == (unit(t.name) in frozen_units)
    body = scores[~scores["is_head"]].assign(unit=lambda s: s.index.map(unit))
    for (layer, category), part in body.groupby(["layer", "category"]):
        units = set(part["unit"])
        frozen = len(units & frozen_units)
        if len(units) % 2 == 0:  # attention 4 -> 2, norm 2 -> 1, other 2 -> 1 in each block
            assert frozen == len(units) // 2, (layer, category)
        else:
            assert frozen in (len(units) // 2, len(units) // 2 + 1), (layer, category)
    for category, part in body.groupby("category"):  # over the body: half, rounded up
        units = set(part["unit"])
        assert len(units & frozen_units) == math.ceil(len(units) / 2), category
    # input: 3 embedding tables (other, odd: the first odd one, rounded up) and 1 norm (odd,
    # first: frozen); output: the pooler (other, the second odd one: rounded down)
    assert (
        len(
            frozen_units
            & {
                "bert.embeddings.word_embeddings",
                "bert.embeddings.position_embeddings",
                "bert.embeddings.token_type_embeddings",
            }
        )
        == 2
    )
    assert "bert.embeddings.LayerNorm" in frozen_units
    assert "bert.pooler.dense" not in frozen_units
    again = strategies.build_plan(bert_tables, "hft", {"kind": "hft", "seed": 0})
    assert [t.frozen for t in again.tensors] == [t.frozen for t in plan.tensors]
    others = [
        [
            t.frozen
            for t in strategies.build_plan(bert_tables, "h", {"kind": "hft", "seed": s}).tensors
        ]
        for s in range(1, 6)
    ]
    assert any(o != [t.frozen for t in plan.tensors] for o in others)
    # the categories come from the module tree, whatever the names
    assert set(tensor_categories(tiny_task(tiny_bert_dir, LABELS).model).values()) == {
        "attention",
        "norm",
        "other",
    }


def test_hft_needs_categorised_scores(bert_tables):
    old = ScoreTables(bert_tables.tensors.drop(columns="category"), bert_tables.layers)
    with pytest.raises(PlanError, match="rerun score_importance"):
        strategies.build_plan(old, "hft", {"kind": "hft"})


# --- progressive freezing -------------------------------------------------------------------


def test_progressive_freezing_keeps_frozen_layers_bit_identical_and_caches_them(
    tiny_bert_dir, bert_tables, caplog
):
    # A threshold no change reaches: after epoch 2 the input layer and both blocks freeze.
    plan = strategies.build_plan(
        bert_tables, "pf", {"kind": "progressive_freeze", "threshold": 100.0}
    )
    task = tiny_task(tiny_bert_dir, LABELS)
    without_dropout(task.model)
    after: dict[int, dict[str, torch.Tensor]] = {}

    def keep(row: dict[str, float]) -> None:
        after[int(row["epoch"])] = {n: p.detach().clone() for n, p in task.model.named_parameters()}

    train = settings(optimizer="adamw", lr=1e-3, weight_decay=0.1, epochs=4, batch_size=4)
    with caplog.at_level(logging.INFO, logger="adaptune"):
        result = training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, CPU, keep)
    record = result.strategy_record
    assert record["frozen_after_epoch"] == {"input": 2, "block01": 2, "block02": 2}
    assert list(record["changes"][0]["change"]) == ["input", "block01", "block02"]
    frozen = [t.name for t in plan.tensors if t.layer in ("input", "block01", "block02")]
    for name in frozen:
        assert not torch.equal(after[1][name], after[2][name]) or "token_type" in name
        assert torch.equal(after[2][name], after[3][name]) and torch.equal(
            after[3][name], after[4][name]
        )
    for name in ("bert.pooler.dense.weight", "classifier.weight"):
        assert not torch.equal(after[3][name], after[4][name])  # never frozen
    assert "feature cache: every layer below output frozen" in caplog.text
    assert not any(p.requires_grad for n, p in task.model.named_parameters() if n in frozen)


def test_progressive_freezing_climbs_from_the_bottom_only(tiny_bert_dir, bert_tables):
    plan = strategies.build_plan(
        bert_tables, "pf", {"kind": "progressive_freeze", "threshold": 0.1}
    )
    task = tiny_task(tiny_bert_dir, LABELS)
    train = settings(optimizer="adamw", lr=1e-3, epochs=5, batch_size=4)
    loop = training.TrainingLoop(task, plan, frame(8, 0), frame(8, 1), train, 0, CPU)
    try:
        hooks = loop.hooks
        assert [name for name, _ in hooks.units] == ["input", "block01", "block02"]
        # epoch 1: norms 1, 1, 1; epoch 2: the input moved 5%, block01 50%, block02 1%
        hooks.sums = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
        hooks.steps = 2
        hooks.on_epoch_end(1, {})
        hooks.sums = torch.tensor([2.1, 3.0, 2.02], dtype=torch.float64)
        hooks.steps = 2
        hooks.on_epoch_end(2, {})
        assert hooks.frozen_after == {"input": 2}  # block02 settled, but block01 did not
        assert hooks.record()["changes"][0]["change"] == pytest.approx(
            {"input": 0.05, "block01": 0.5, "block02": 0.01}
        )
        input_names = [t.name for t in plan.tensors if t.layer == "input"]
        params = dict(task.model.named_parameters())
        assert not any(params[n].requires_grad for n in input_names)
        assert all(params[n].requires_grad for n in params if n not in input_names)
    finally:
        loop.close()


# --- DDP ----------------------------------------------------------------------------------


def lisa_once(model_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    task = tiny_task(Path(model_dir), LABELS)
    without_dropout(task.model)
    scores = pd.read_parquet(Path(model_dir).parent / "scores.parquet")
    tables = ScoreTables(scores, layer_table(scores))
    plan = strategies.build_plan(
        tables, "lisa", {"kind": "lisa", "layers": 1, "interval_steps": 1, "seed": 3}
    )
    train = TrainSettings.from_config(
        {"optimizer": "adamw", "lr": 1e-2, "epochs": 2, "batch_size": 7, "device": "cpu"}
    )
    result = training.train(task, plan, frame(15, 0), frame(9, 1), train, 0, CPU)
    weights = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    return weights, result.strategy_record


def lisa_in_group(job: dict[str, Any]) -> None:
    world = distributed.current()
    torch.save(lisa_once(job["model_dir"]), Path(job["out"]) / f"rank{world.rank}.pt")


def test_lisa_under_two_gloo_processes_takes_the_steps_of_one(
    tiny_bert_dir,
    bert_tables,
    tmp_path,
    workers,  # noqa: F811
):
    import shutil

    model_dir = tmp_path / "model" / "bert"
    shutil.copytree(tiny_bert_dir, model_dir)
    bert_tables.tensors.to_parquet(model_dir.parent / "scores.parquet")
    distributed.launch(
        2, "tests.test_methods:lisa_in_group", {"model_dir": str(model_dir), "out": str(tmp_path)}
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single, record = lisa_once(str(model_dir))
    before = {n: p.detach() for n, p in tiny_task(model_dir, LABELS).model.named_parameters()}
    assert ranks[0][1]["periods"] == record["periods"]  # the same schedule in every process
    switched = {p["blocks"][0] for p in record["periods"]}
    assert switched == {"block01", "block02"}
    for name, value in single.items():
        assert torch.equal(ranks[0][0][name], ranks[1][0][name]), name  # replicas agree
        torch.testing.assert_close(ranks[0][0][name], value, rtol=1e-5, atol=1e-5, msg=name)
        if "encoder" in name and "token_type" not in name:
            assert not torch.equal(value, before[name]), name  # each block trained some steps


# --- a decoder and a ViT ------------------------------------------------------------------

NEW_KINDS = {
    "lisa": {"kind": "lisa", "layers": 1, "interval_fraction": 0.25},
    "lisa_importance": {"kind": "lisa_importance", "layers": 1, "interval_fraction": 0.25},
    "badam": {"kind": "badam", "interval_fraction": 0.2, "include_input_output": True},
    "sparse_mask": {"kind": "sparse_mask", "density": 0.1, "scope": "row"},
    "hft": {"kind": "hft"},
    "progressive_freeze": {"kind": "progressive_freeze", "threshold": 100.0},
}


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory):
    """A randomly initialised 2-block GPT-2 (a decoder: the head reads every position and the
    model pools the last real token) with the MiniLM tokenizer, its scores and its data."""
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from adaptune.modalities.text.models import resolve_model

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("bundled:all-MiniLM-L6-v2"))
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)

    def load():
        return tiny_task(directory, LABELS)

    return load, scored(load(), frame(16, 0)), frame(16, 0), frame(9, 1)


@pytest.fixture(scope="module")
def vit_case(tmp_path_factory):
    """timm's ``test_vit`` (6 blocks, attention, a class token) at 32 px, randomly initialised
    and saved as adaptune saves an image model, on real digits."""
    import timm

    from adaptune.data import read_split, run_prepare_data
    from adaptune.modalities.image import MODALITY as IMAGE
    from adaptune.modalities.image.models import save_classifier
    from adaptune.modalities.image.transforms import ImageTransform
    from adaptune.settings import DataSettings, ModelSettings

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    model.set_input_size(img_size=32)  # 4 patches: seconds on a CPU
    transform = ImageTransform((32, 32), 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    directory = tmp_path_factory.mktemp("tiny-vit")
    labels = [str(i) for i in range(model.num_classes)]
    save_classifier(model, directory, "timm:test_vit", labels, transform.to_dict())
    out = tmp_path_factory.mktemp("vit-digits")
    paths = {name: str(out / f"{name}.parquet") for name in ("train", "val", "test")}
    settings = ModelSettings.from_config(f"path:{directory}")
    info = run_prepare_data(
        DataSettings.from_config({"source": "bundled:digits"}), settings, paths, str(out / "d.json")
    )
    train, val = read_split(paths["train"]).head(16), read_split(paths["val"]).head(8)

    def load():
        return IMAGE.bind(info).load_pretrained(settings, 0)

    return load, scored(load(), train), train, val


def scored(task, train: pd.DataFrame) -> ScoreTables:
    batches = calibration_batches(task.modality, train, 1, 8, seed=0)
    scores, _ = score_model(task, batches, ["grad_norm", "fisher", "depth", "combined"], probes=2)
    return ScoreTables(scores, layer_table(scores))


@pytest.mark.parametrize("kind", list(NEW_KINDS))
@pytest.mark.parametrize("case", ["gpt2_case", "vit_case"])
def test_every_new_kind_trains_a_decoder_and_a_vit(case, kind, request):
    load, tables, train, val = request.getfixturevalue(case)
    plan = strategies.build_plan(tables, kind, NEW_KINDS[kind], settings(batch_size=8))
    task = load()
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    train_settings = settings(optimizer="adamw", lr=1e-3, epochs=3, batch_size=4)
    result = training.train(task, plan, train, val, train_settings, 0, CPU)
    assert np.isfinite(result.history["train_loss"]).all()
    after = dict(task.model.named_parameters())
    for t in plan.tensors:
        if t.frozen:
            assert torch.equal(after[t.name].detach(), before[t.name]), t.name
    moved = [n for n in before if not torch.equal(after[n].detach(), before[n])]
    assert set(task.head) <= set(moved)
    record = result.strategy_record
    if kind in ("lisa", "lisa_importance", "badam"):
        assert len({tuple(p["blocks"]) for p in record["periods"]}) > 1  # it switched
    elif kind == "progressive_freeze":
        assert set(record["frozen_after_epoch"].values()) == {2}
    elif kind == "sparse_mask":
        assert 0 < record["density"] <= 0.1 + 1e-9
    elif kind == "hft":
        frozen = sum(t.frozen for t in plan.tensors)
        assert 0.3 < frozen / len(plan.tensors) < 0.7
