"""Predictions of a fine-tuned model on new, unlabelled inputs (``adaptune predict``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from adaptune import modalities

log = logging.getLogger(__name__)


def predict_file(
    model: str | Path, inputs: str | Path, column: str | None = None, batch_size: int = 32
) -> pd.DataFrame:
    """One row per input: its ``id``, the ``predicted`` label, its ``probability``, and the
    probability of each label (``p_<label>``). ``inputs`` is a CSV (``column`` holds the texts,
    or the image paths) or, for an image model, a folder of images."""
    modality = modalities.saved_in(model)
    table = modality.read_inputs(Path(inputs), column)
    labels, probabilities = modality.predict(model, table["input"].tolist(), batch_size)
    frame = pd.DataFrame(
        {
            "id": table["id"],
            "predicted": [labels[i] for i in probabilities.argmax(1)],
            "probability": probabilities.max(1),
        }
    )
    for index, label in enumerate(labels):
        frame[f"p_{label}"] = probabilities[:, index]
    log.info("%d %s input(s) predicted by %s", len(frame), modality.name, model)
    return frame
