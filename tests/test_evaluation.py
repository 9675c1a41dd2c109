import numpy as np
import pytest

from adaptune.evaluation import classification_metrics, evaluate_predictions
from adaptune.figures import plot_confusion


def test_metrics_on_a_known_case():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    scores = classification_metrics(y_true, y_pred, num_labels=3)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: 0 -> 2*(1/2*1/2)/(1) = 0.5; 1 -> P 2/3 R 1 -> 0.8; 2 -> P 1 R 1/2 -> 2/3
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_a_class_never_predicted_counts_as_zero_f1():
    scores = classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), num_labels=4)
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)


def test_evaluate_predictions_tables(tmp_path):
    logits = np.array([[2.0, 0.1], [0.2, 1.0], [3.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    metrics, per_class, matrix = evaluate_predictions(
        np.array([0, 1, 1, 1]), logits, ["neg", "pos"]
    )
    assert metrics["test_accuracy"] == 0.75 and metrics["test_examples"] == 4
    assert matrix.loc["pos", "neg"] == 1 and matrix.loc["pos", "pos"] == 2
    assert per_class.set_index("label").loc["pos", "recall"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["neg"]["precision"] == 0.5
    plot_confusion(matrix, tmp_path / "c.png", "test")
    assert (tmp_path / "c.png").stat().st_size > 5_000


def test_the_metrics_agree_with_scikit_learn_on_random_labels():
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from adaptune.evaluation import confusion_counts, per_class_metrics

    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 7))
        y_true, y_pred = rng.integers(0, k, 50), rng.integers(0, k - 1, 50)  # a class unpredicted
        ours = classification_metrics(y_true, y_pred, k)
        labels = list(range(k))
        expected = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        assert ours["macro_f1"] == pytest.approx(expected)
        table = per_class_metrics(y_true, y_pred, [str(i) for i in labels])
        reference = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        for column, values in zip(["precision", "recall", "f1", "support"], reference, strict=True):
            np.testing.assert_allclose(table[column], values)
        np.testing.assert_array_equal(
            confusion_counts(y_true, y_pred, k), confusion_matrix(y_true, y_pred, labels=labels)
        )
