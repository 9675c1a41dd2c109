"""Images: torchvision and timm models on labelled images.

Sources and the decoded-image cache are in :mod:`.sources`, the model's input transform and
augmentations in :mod:`.transforms`, models in :mod:`.models`. A prepared split holds ``item``,
``image`` (raw RGB bytes, no larger than the model's resize size), ``height`` and ``width``;
``data.json`` holds the model's input transform. The baseline is logistic regression on 16x16
pixels.

The workflow reads this module when it parses the Snakefile, to tell which sources and models
are images (:mod:`.catalog`), and every text job reads it too; the submodules import torchvision
(1.2 s on top of torch, measured), so the methods that need them import them, and MLflow and
scikit-learn are imported where a model is logged or a baseline made.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from adaptune.errors import DataError
from adaptune.modalities.base import (
    Baseline,
    Batch,
    Examples,
    Modality,
    TaskModel,
    installed_version,
)
from adaptune.modalities.files import files_under, local_file, read_input_table
from adaptune.modalities.image.catalog import (
    BUNDLED_MODELS,
    BUNDLED_SOURCES,
    IMAGE_EXTENSIONS,
    MODEL_KINDS,
    SAVED_MODEL_FILE,
    SOURCE_KINDS,
)
from adaptune.modalities.image.shifts import SHIFTS
from adaptune.modalities.shifts import Shift, perturbed
from adaptune.settings import DataSettings, ModelSettings
from adaptune.tracking import log_flavor_model

if TYPE_CHECKING:
    from adaptune.modalities.image.transforms import ImageTransform

log = logging.getLogger(__name__)

PIXEL_SIDE = 16


def pixel_features(frame: pd.DataFrame) -> np.ndarray:
    """Each cached image resized (antialiased) to 16x16 RGB, flattened, in [0, 1]."""
    from adaptune.modalities.image.transforms import resized_pixels

    return np.stack(
        [
            resized_pixels(data, int(height), int(width), PIXEL_SIDE).flatten().numpy() / 255.0
            for data, height, width in zip(
                frame["image"], frame["height"], frame["width"], strict=True
            )
        ]
    )


def pixel_logreg(seed: int) -> Any:
    """Standardised pixels + multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, random_state=seed)
    )


class ImageModality(Modality):
    name = "image"
    local_models = f"an image model saved by adaptune ({SAVED_MODEL_FILE})"
    baselines: ClassVar[Mapping[str, Baseline]] = {
        "pixel_logreg": Baseline(
            "pixel_logreg",
            features=pixel_features,
            make=pixel_logreg,
            describe=lambda fitted: {"pixels": PIXEL_SIDE * PIXEL_SIDE * 3},
        )
    }

    def reads_source(self, data: DataSettings) -> bool:
        if data.kind == "bundled":
            return data.location in BUNDLED_SOURCES
        if data.kind == "csv":
            return bool(data.image_column)
        return data.kind in SOURCE_KINDS

    def downloads(self, data: DataSettings, model: ModelSettings) -> bool:
        named_weights = model.kind in MODEL_KINDS and not Path(model.weights).suffix
        return data.kind == "torchvision" or named_weights

    def reads_model(self, model: ModelSettings) -> bool:
        if model.kind == "bundled":
            return model.location in BUNDLED_MODELS
        if model.kind == "path":
            return (Path(model.location) / SAVED_MODEL_FILE).is_file()
        return model.kind in MODEL_KINDS

    def source_files(self, data: DataSettings) -> list[Path]:
        from adaptune.modalities.image import sources

        if data.kind == "imagefolder":
            return [path for _, path in sources.image_folder_files(Path(data.location))]
        if data.kind == "csv":
            table = sources.image_csv(data)
            return [local_file(data), *table["file"]]
        return []

    def source_version(self, data: DataSettings) -> str:
        # The package that ships (bundled) or defines (torchvision) the dataset.
        packages = {"bundled": "scikit-learn", "torchvision": "torchvision"}
        return installed_version(packages[data.kind]) if data.kind in packages else ""

    def model_files(self, model: ModelSettings) -> list[Path]:
        weights = Path(model.weights)
        return [weights] if weights.suffix and weights.is_file() else super().model_files(model)

    def model_version(self, model: ModelSettings) -> str:
        if model.kind == "bundled":
            return installed_version(BUNDLED_MODELS[model.location])
        # Pretrained weights named, not given as a file: what the library downloads.
        return installed_version(model.kind) if model.kind in MODEL_KINDS else ""

    def load_examples(self, data: DataSettings) -> pd.DataFrame:
        from adaptune.modalities.image import sources

        return sources.load_images(data)

    def input_key(self, frame: pd.DataFrame) -> pd.Series:
        """SHA-256 of each decoded image (its shape and RGB pixels)."""
        return frame["image"].map(
            lambda image: hashlib.sha256(
                str(image.shape).encode() + np.ascontiguousarray(image).tobytes()
            ).hexdigest()
        )

    def fingerprint(self, frame: pd.DataFrame) -> str:
        from adaptune.modalities.image import sources

        return sources.image_fingerprint(frame)

    def encode(
        self, splits: dict[str, pd.DataFrame], data: DataSettings, model: ModelSettings
    ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
        from adaptune.modalities.image import models, sources

        transform = models.model_transform(model.name, model.weights, image_size=model.image_size)
        splits = {name: sources.encode_images(part, transform) for name, part in splits.items()}
        sizes = pd.concat(splits.values())[["height", "width"]]
        return splits, {
            "cached_image_sizes": {
                "min": [int(sizes["height"].min()), int(sizes["width"].min())],
                "max": [int(sizes["height"].max()), int(sizes["width"].max())],
            },
            "transform": transform.to_dict(),
        }

    shifts: ClassVar[Mapping[str, Shift]] = SHIFTS

    def shift(
        self,
        frame: pd.DataFrame,
        kind: str,
        severity: int,
        seed: int,
        data: DataSettings,
        model: ModelSettings,
    ) -> pd.DataFrame:
        """The cached images resized as the model's transform resizes them (before its centre
        crop), corrupted there (:mod:`.shifts`) and cached at that size."""
        from adaptune.modalities.image.transforms import resized_for_model

        transform = self.transform
        images = [
            resized_for_model(data, int(h), int(w), transform)
            for data, h, w in zip(frame["image"], frame["height"], frame["width"], strict=True)
        ]
        images = perturbed(images, frame["example_id"], SHIFTS[kind], severity, seed)
        return frame.assign(
            image=[np.ascontiguousarray(image).tobytes() for image in images],
            height=np.array([image.shape[0] for image in images], dtype=np.int32),
            width=np.array([image.shape[1] for image in images], dtype=np.int32),
        )

    @property
    def transform(self) -> ImageTransform:
        """The model's input transform that ``prepare_data`` recorded."""
        from adaptune.modalities.image.transforms import ImageTransform

        return ImageTransform.from_dict(self.info.encoding["transform"])

    def examples(
        self,
        frame: pd.DataFrame,
        augment: Sequence[str] = (),
        seed: int = 0,
    ) -> Examples:
        """``{pixel_values, labels, index}`` in the model's transform, with the train-time
        ``augment`` steps."""
        from adaptune.modalities.image.transforms import ImageExamples

        return ImageExamples(frame, self.transform, augment, seed)

    def model_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch["pixel_values"],), {}

    def load_pretrained(self, model: ModelSettings, seed: int) -> TaskModel:
        from adaptune.modalities.image import models

        network, head, _ = models.load_classifier(model, self.info.labels, seed)
        log.info(
            "Loaded %s; new classifier for %d classes, initialised from seed %d (expected): %s",
            model.name,
            self.info.num_labels,
            seed,
            ", ".join(head),
        )
        return TaskModel(network, head, self)

    def save(self, task: TaskModel, directory: str | Path, model: ModelSettings) -> None:
        from adaptune.modalities.image import models

        models.save_classifier(
            task.model, directory, model.name, self.info.labels, self.info.encoding["transform"]
        )

    def load_finetuned(self, directory: str | Path) -> TaskModel:
        from adaptune.modalities.image import models

        network, head = models.load_saved_classifier(directory)
        return TaskModel(network, head, self)

    def saved_here(self, directory: Path) -> bool:
        return (directory / SAVED_MODEL_FILE).is_file()

    def read_inputs(self, source: Path, column: str | None) -> pd.DataFrame:
        """A folder (every image file under it, its relative path as ``id``) or a CSV whose
        ``column`` (default ``image``) holds paths, relative to the CSV's folder."""
        if source.is_dir():
            files = [f for f in files_under(source) if f.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise DataError(f"{source}: no image files ({kinds}) in it")
            ids = [str(f.relative_to(source)) for f in files]
            return pd.DataFrame({"id": ids, "input": [str(f) for f in files]})
        table = read_input_table(source, column or "image", "a CSV of image paths, or a folder")
        table["input"] = [str(source.parent / p) for p in table["input"]]  # absolute paths stay
        return table

    def predict(
        self, directory: str | Path, inputs: Sequence[Any], batch_size: int = 32
    ) -> tuple[list[str], np.ndarray]:
        """Each image file decoded, shrunk and transformed as ``prepare_data`` and
        ``evaluate`` do for the test split."""
        from adaptune.modalities.image import models
        from adaptune.modalities.image.sources import encode_images, open_image
        from adaptune.modalities.image.transforms import ImageTransform, image_tensor

        saved = json.loads((Path(directory) / SAVED_MODEL_FILE).read_text())
        transform = ImageTransform.from_dict(saved["transform"])
        network, _ = models.load_saved_classifier(directory)
        network.eval()
        probabilities = []
        for start in range(0, len(inputs), batch_size):
            images = [open_image(Path(p)) for p in inputs[start : start + batch_size]]
            cached = encode_images(pd.DataFrame({"image": images}), transform)
            pixels = torch.stack(
                [
                    image_tensor(row.image, row.height, row.width, transform)
                    for row in cached.itertuples()
                ]
            )
            with torch.no_grad():
                probabilities.append(network(pixels).float().softmax(-1).numpy())
        labels = list(saved["labels"])
        return labels, np.concatenate(probabilities or [np.zeros((0, len(labels)))])

    def log_model(
        self, directory: str | Path, run_id: str, tracking_uri: str, example: pd.DataFrame
    ) -> str:
        """``mlflow.pytorch``: the whole network (loading it needs adaptune's architectures:
        torchvision or timm); normalised float images (N, 3, H, W) in, logits out."""
        import mlflow.pytorch
        from mlflow.types import Schema, TensorSpec

        from adaptune.modalities.image import models
        from adaptune.modalities.image.transforms import ImageTransform, image_tensor

        saved = json.loads((Path(directory) / SAVED_MODEL_FILE).read_text())
        height, width = saved["transform"]["input_size"]
        transform = ImageTransform.from_dict(saved["transform"])
        pixels = torch.stack(
            [image_tensor(r.image, r.height, r.width, transform) for r in example.itertuples()]
        )
        network, _ = models.load_saved_classifier(directory)
        network.eval()
        return log_flavor_model(
            mlflow.pytorch.log_model,
            run_id,
            tracking_uri,
            ("torchvision", "timm", "adaptune"),
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, height, width))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(saved["labels"])))]),
            pytorch_model=network,
            input_example=pixels.numpy(),
        )


MODALITY = ImageModality()
