"""The frozen-prefix cache: where the boundary is, that cached training is exact where it claims
to be (no dropout), that frozen tensors stay bit-identical, and that it steps aside where the
network's frozen part is not a chain of modules."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from adaptune import training
from adaptune.data_info import DataInfo
from adaptune.modalities import TaskModel
from adaptune.modalities.base import Examples
from adaptune.modalities.image import MODALITY as IMAGE
from adaptune.plans import Plan, TensorPlan
from adaptune.prefix import FeatureStore, find_boundary
from adaptune.settings import TrainSettings

from .conftest import tiny_task
from .test_training import frame


def plan_for(model: nn.Module, trains, kind: str = "full", head=()) -> Plan:
    return Plan(
        kind,
        kind,
        [
            TensorPlan(
                n, "l", 0, p.numel(), not trains(n), 0.0 if not trains(n) else 1.0, "", 1, n in head
            )
            for n, p in model.named_parameters()
        ],
    )


def without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def test_the_boundary_is_the_first_layer_that_trains(tiny_bert_dir):
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    model = task.model
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("classifier"))
    head_only = find_boundary(model, task.head)
    assert head_only.inject == "classifier" and head_only.layer == "head"
    assert head_only.removed == ("bert.encoder.layer.0", "bert.encoder.layer.1")
    assert head_only.passed == ("bert.pooler.dense",)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(("bert.embeddings", "bert.encoder.layer.0.")))
    bottom = find_boundary(model, task.head)
    assert bottom.inject == "bert.encoder.layer.1" and bottom.removed == ("bert.encoder.layer.0",)
    for param in model.parameters():
        param.requires_grad_(True)
    assert find_boundary(model, task.head) is None  # nothing frozen
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    assert find_boundary(model, task.head) is None  # no whole block frozen: not worth it


@pytest.mark.parametrize(
    "trains",
    [
        lambda n: n.startswith("classifier"),
        lambda n: not n.startswith(("bert.embeddings", "bert.encoder.layer.0.")),
    ],
    ids=["head only", "bottom block frozen"],
)
def test_cached_training_is_exact_without_dropout(tiny_bert_dir, trains, caplog):
    caplog.set_level("INFO")

    def train(cache: str) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
        task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
        without_dropout(task.model)
        plan = plan_for(task.model, trains)
        settings = TrainSettings.from_config(
            {"epochs": 3, "batch_size": 8, "lr": 1e-2, "feature_cache": cache}
        )
        before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        result = training.train(
            task, plan, frame(24, 0), frame(12, 1), settings, 0, torch.device("cpu")
        )
        after = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        for t in plan.tensors:
            if t.frozen:
                assert torch.equal(before[t.name], after[t.name]), t.name  # bit-identical
        return after, result.history

    cached, cached_history = train("auto")
    assert "feature cache: every layer below" in caplog.text
    full, full_history = train("off")
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)
    columns = ["train_loss", "val_loss", "val_macro_f1"]
    np.testing.assert_allclose(cached_history[columns], full_history[columns], rtol=1e-4, atol=1e-6)


def test_an_image_model_trains_its_head_on_cached_features(tiny_vision_dir, caplog):
    caplog.set_level("INFO")
    from .test_image import load

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) for _ in range(30)]
    table = pd.DataFrame(
        {
            "image": [i.tobytes() for i in images],
            "height": 12,
            "width": 12,
            "label_id": np.arange(30) % 3,
        }
    )
    transform = {"input_size": [32, 32], "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    info = DataInfo.for_labels("image", ["a", "b", "c"], transform=transform)

    def train(cache: str) -> dict[str, torch.Tensor]:
        task = load(tiny_vision_dir, info)
        plan = plan_for(task.model, lambda n: n in task.head)
        settings = TrainSettings.from_config(
            {"epochs": 2, "batch_size": 8, "lr": 1e-2, "feature_cache": cache}
        )
        training.train(task, plan, table.head(21), table.tail(9), settings, 0, torch.device("cpu"))
        return {n: p.detach().clone() for n, p in task.model.named_parameters()}

    cached = train("auto")
    assert "the inputs of fc cached" in caplog.text
    full = train("off")
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)


class SumOfBlocks(nn.Module):
    """Every block's output reaches the head: the frozen part is not a chain ending at the
    first block that trains."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, total = self.embed(x), 0
        for block in self.blocks:
            h = torch.tanh(block(h))
            total = total + h
        return self.head(total)


class VectorExamples(Examples):
    """Rows of a float column, fed like an image model's input."""

    def __init__(self, frame: pd.DataFrame) -> None:
        super().__init__(frame["label_id"].to_numpy())
        self.x = torch.tensor(np.stack(frame["x"]))

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[index]}


class Vectors(type(IMAGE)):
    def examples(self, frame, augment=(), seed=0):
        return VectorExamples(frame)


def test_a_prefix_that_is_not_a_chain_falls_back_to_the_full_forward(caplog):
    torch.manual_seed(0)
    model = SumOfBlocks()
    task = TaskModel(model, ("head.weight", "head.bias"), Vectors())
    rows = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    data = pd.DataFrame({"x": list(rows), "label_id": np.arange(20) % 3})
    plan = plan_for(model, lambda n: n.startswith(("blocks.2", "head")))
    settings = TrainSettings.from_config({"epochs": 2, "batch_size": 5, "lr": 1e-2})
    result = training.train(
        task, plan, data.head(15), data.tail(5), settings, 0, torch.device("cpu")
    )
    assert "feature cache off: the cached and the full forward disagree" in caplog.text
    assert len(result.history) == 2


def test_the_feature_store_spills_to_disk_beyond_its_limit():
    tensors = [torch.randn(5, 3), torch.randn(2, 3), torch.arange(6).reshape(2, 3)]
    store = FeatureStore(3, limit_bytes=5 * 3 * 4)  # room for the first one only
    for i, tensor in enumerate(tensors):
        store.put(i, tensor)
    assert store.items[0] is not None and store.items[1] is None and store.spill is not None
    for i, tensor in enumerate(tensors):
        assert torch.equal(store.get(i), tensor)
    folder = store.folder
    store.close()
    import os

    assert not os.path.exists(folder)
