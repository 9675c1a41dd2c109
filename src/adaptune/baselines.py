"""Classical baselines on the same few-shot split, so a leaderboard shows what the pretrained
model buys: TF-IDF features (word 1-2 grams, sublinear term frequency) and a multinomial
logistic regression (scikit-learn)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

BASELINES = ("tfidf_logreg",)


def fit_tfidf_logreg(train: pd.DataFrame, seed: int = 0) -> object:
    """A fitted TF-IDF + logistic regression pipeline on ``text`` -> ``label_id``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
    )
    return model.fit(train["text"], train["label_id"])


def run_baseline(
    name: str,
    shots: str,
    train_path: str,
    test_path: str,
    data_info_path: str,
    experiment_path: str,
    outputs: dict[str, str],
) -> dict:
    """Fit baseline ``name`` on the few-shot split, evaluate it on the test split like the
    fine-tuned models, and record it as an MLflow run."""
    from adaptune import tracking
    from adaptune.data import read_data_info, read_split
    from adaptune.evaluation import evaluate_predictions, log_evaluation, save_evaluation

    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    info = read_data_info(data_info_path)
    train, test = read_split(train_path), read_split(test_path)
    start = time.perf_counter()
    model = fit_tfidf_logreg(train)
    train_seconds = time.perf_counter() - start
    probabilities = np.zeros((len(test), len(info["labels"])))
    probabilities[:, model.classes_] = model.predict_proba(test["text"])
    logits = np.log(np.clip(probabilities, 1e-12, 1)).astype(np.float32)
    metrics, per_class, matrix = evaluate_predictions(
        test["label_id"].to_numpy(), logits, info["labels"]
    )
    classifier = model[-1]
    experiment = tracking.read_experiment(experiment_path)
    tags = {"strategy": name, "shots": shots, "seed": "0", "stage": "baseline"}
    with tracking.mlflow_run(experiment, run_name=f"{name}-k{shots}", tags=tags) as run:
        metrics = {
            "strategy": name,
            "shots": shots,
            "seed": 0,
            "trainable_params": int(classifier.coef_.size + classifier.intercept_.size),
            "trainable_fraction": None,  # not a fine-tuned pretrained model
            "train_seconds": train_seconds,
            "best_epoch": None,
            "best_val_macro_f1": None,
            "mlflow_run_id": run.info.run_id,
            **metrics,
        }
        tracking.log_params(
            {"strategy": name, "shots": shots, "vocabulary": len(model[0].vocabulary_)}
        )
        title = f"{name}, {shots} shots: macro-F1 {metrics['test_macro_f1']:.3f}"
        save_evaluation(metrics, per_class, matrix, title, outputs)
        log_evaluation(metrics, outputs)
    return metrics
