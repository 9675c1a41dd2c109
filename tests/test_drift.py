"""How far a fine-tuned model moved from its pretrained weights: linear CKA against its
definition, the relative weight change of the body, the head's input found from the module
tree, and ``evaluate``'s drift of a fine-tuned tiny BERT (zero for a frozen body)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adaptune import training
from adaptune.evaluation import HeadInputs, drift, head_module, linear_cka, predict, weight_change
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import TrainSettings

from .conftest import tiny_task
from .test_training import frame

LABELS = ["a", "b", "c"]
CPU = torch.device("cpu")


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA written as Kornblith et al. define it: HSIC of the linear kernels, with the
    centring matrix H, normalised."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_matches_its_definition_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    y = x @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(50, 5))
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, 3.0 * x @ rotation + 7.0) == pytest.approx(1.0, abs=1e-12)
    unrelated = linear_cka(x, rng.normal(size=(50, 8)))
    assert unrelated < 0.4 and unrelated == pytest.approx(
        hsic_cka(x, rng.normal(size=(50, 8))), abs=0.4
    )
    assert 0.5 < linear_cka(x, y) < 1.0


def test_weight_change_is_relative_and_leaves_the_head_out(tiny_bert_dir):
    pretrained = tiny_task(tiny_bert_dir, LABELS)
    tuned = tiny_task(tiny_bert_dir, LABELS, seed=1)  # another head, the same body
    assert weight_change(pretrained.model, tuned.model, pretrained.head) == 0.0
    body = [p for n, p in tuned.model.named_parameters() if n not in tuned.head]
    with torch.no_grad():
        delta = torch.full_like(body[5], 0.01)
        body[5].add_(delta)
    base = [p for n, p in pretrained.model.named_parameters() if n not in pretrained.head]
    norm = float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in base)))
    expected = float(delta.double().norm()) / norm
    assert weight_change(pretrained.model, tuned.model, pretrained.head) == pytest.approx(expected)


def test_the_head_input_is_the_body_output_the_head_reads(tiny_bert_dir):
    task = tiny_task(tiny_bert_dir, LABELS)
    assert head_module(task) == "classifier"
    test = frame(11, 2)
    features = HeadInputs(task, len(test))
    logits = predict(task, test, 4, CPU, head_inputs=features)
    assert features.features.shape == (11, 32)
    # the head applied to the captured features gives the logits, row by row
    head = task.model.classifier
    again = head(features.features.float()).detach().numpy()
    np.testing.assert_allclose(again, logits, atol=1e-5)


def full_plan(model: torch.nn.Module, head: tuple[str, ...], frozen_body: bool) -> Plan:
    return Plan(
        "p",
        "full",
        [
            TensorPlan(n, "l", 0, p.numel(), frozen_body and n not in head, 1.0, "", 1, n in head)
            for n, p in model.named_parameters()
        ],
    )


@pytest.mark.parametrize("frozen_body", [True, False])
def test_drift_is_zero_for_a_frozen_body_and_grows_with_training(tiny_bert_dir, frozen_body):
    pretrained = tiny_task(tiny_bert_dir, LABELS)
    task = tiny_task(tiny_bert_dir, LABELS)
    plan = full_plan(task.model, task.head, frozen_body)
    settings = TrainSettings.from_config({"lr": 5e-3, "epochs": 3, "batch_size": 4})
    training.train(task, plan, frame(16, 0), frame(9, 1), settings, 0, CPU)
    measured = drift(pretrained, task, frame(30, 3), 8, CPU)
    if frozen_body:
        assert measured["weight_change"] == 0.0
        assert measured["cka_drift"] == pytest.approx(0.0, abs=1e-9)
    else:
        assert 0.001 < measured["weight_change"] < 1.0
        assert 0.001 < measured["cka_drift"] <= 1.0


def test_evaluate_records_drift_in_its_metrics(tiny_bert_dir, tmp_path):
    """``run_evaluate`` with the model's settings writes weight_change and cka_drift beside the
    test metrics (the MLflow part is the tracking tests'; here a stand-in run)."""
    from adaptune import evaluation
    from adaptune.data_info import DataInfo
    from adaptune.settings import ModelSettings

    task = tiny_task(tiny_bert_dir, LABELS)
    plan = full_plan(task.model, task.head, False)
    settings = TrainSettings.from_config({"lr": 5e-3, "epochs": 2, "batch_size": 4})
    training.train(task, plan, frame(16, 0), frame(9, 1), settings, 0, CPU)
    task.model.save_pretrained(tmp_path / "model")
    test = frame(12, 4).assign(label=lambda f: f["label_id"].map(dict(enumerate(LABELS))))
    test.to_parquet(tmp_path / "test.parquet")
    info = DataInfo.for_labels("text", LABELS, pad_token_id=0, max_length=32)
    info.write(tmp_path / "data.json")
    (tmp_path / "summary.json").write_text(json.dumps({"strategy": "p", "shots": "4", "seed": 0}))

    class Run:
        def __init__(self) -> None:
            self.metrics: dict = {}
            self.stages: list[str] = []

        def log_metrics(self, metrics):
            self.metrics.update(metrics)

        def log_artifact(self, path, folder=None):
            pass

        def logged(self, stage):
            self.stages.append(stage)

    run = Run()
    outputs = {k: str(tmp_path / f"{k}.out") for k in ("metrics", "per_class", "confusion")}
    outputs["confusion_png"] = str(tmp_path / "confusion.png")
    original = (evaluation.tracking.read_experiment, evaluation.tracking.existing_run)
    evaluation.tracking.read_experiment = lambda path: {}
    evaluation.tracking.existing_run = lambda experiment, run_id: run
    (tmp_path / "run_id").write_text("x\n")
    model = ModelSettings.from_config(f"path:{tiny_bert_dir}")

    def evaluate(pretrained_features=None):
        return evaluation.run_evaluate(
            str(tmp_path / "model"),
            str(tmp_path / "test.parquet"),
            str(tmp_path / "data.json"),
            str(tmp_path / "summary.json"),
            str(tmp_path / "run_id"),
            str(tmp_path / "experiment.json"),
            "cpu",
            8,
            "fp32",
            outputs,
            model=model,
            pretrained_features=pretrained_features,
        )

    try:
        metrics = evaluate()
        written = json.loads((tmp_path / "metrics.out").read_text())
        # the pretrained model's features computed once for the experiment (the
        # pretrained_features stage): the same drift
        features = tmp_path / "features.npy"
        evaluation.run_pretrained_features(
            str(tmp_path / "test.parquet"),
            str(tmp_path / "data.json"),
            model,
            "cpu",
            8,
            "fp32",
            str(features),
        )
        assert np.load(features).shape == (12, 32)
        again = evaluate(str(features))
    finally:
        evaluation.tracking.read_experiment, evaluation.tracking.existing_run = original
    assert written["weight_change"] == metrics["weight_change"] > 0
    assert 0 < written["cka_drift"] <= 1
    assert run.metrics["weight_change"] == metrics["weight_change"]
    assert run.stages == ["evaluate", "evaluate"]
    assert again["cka_drift"] == metrics["cka_drift"]
    assert again["weight_change"] == metrics["weight_change"]
