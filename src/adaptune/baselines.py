"""Classical baselines on the same few-shot split, so a leaderboard shows what the pretrained
model buys: a multinomial logistic regression (scikit-learn) on TF-IDF features (text: word 1-2
grams, sublinear term frequency) or on raw pixels (images: each image resized to 16x16 RGB,
standardised)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from adaptune.errors import ConfigError
from adaptune.settings import BASELINES, baselines_mismatch

PIXEL_SIDE = 16


def pixel_features(frame: pd.DataFrame) -> np.ndarray:
    """Each cached image resized (antialiased) to 16x16 RGB, flattened, in [0, 1]."""
    import torchvision.transforms.v2.functional as F

    from adaptune.vision import cached_image

    rows = []
    for data, height, width in zip(frame["image"], frame["height"], frame["width"], strict=True):
        image = cached_image(data, int(height), int(width))
        small = F.resize(image, [PIXEL_SIDE, PIXEL_SIDE], antialias=True)
        rows.append(small.flatten().numpy() / 255.0)
    return np.stack(rows)


def fit_pixel_logreg(train: pd.DataFrame, seed: int = 0) -> object:
    """A fitted standardise + logistic regression pipeline on pixels -> ``label_id``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, random_state=seed)
    )
    return model.fit(pixel_features(train), train["label_id"])


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
    modality = info.get("modality", "text")
    problem = baselines_mismatch([name], modality)
    if problem:
        raise ConfigError(problem)
    train, test = read_split(train_path), read_split(test_path)
    start = time.perf_counter()
    if modality == "image":
        model = fit_pixel_logreg(train)
        test_inputs = pixel_features(test)
    else:
        model = fit_tfidf_logreg(train)
        test_inputs = test["text"]
    train_seconds = time.perf_counter() - start
    probabilities = np.zeros((len(test), len(info["labels"])))
    probabilities[:, model.classes_] = model.predict_proba(test_inputs)
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
        features = (
            {"vocabulary": len(model[0].vocabulary_)}
            if modality == "text"
            else {"pixels": PIXEL_SIDE * PIXEL_SIDE * 3}
        )
        tracking.log_params({"strategy": name, "shots": shots, **features})
        title = f"{name}, {shots} shots: macro-F1 {metrics['test_macro_f1']:.3f}"
        save_evaluation(metrics, per_class, matrix, title, outputs)
        log_evaluation(metrics, outputs)
    return metrics
