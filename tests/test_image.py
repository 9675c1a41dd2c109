"""Image models and data: the bundled EfficientNet-Lite0's weights and predictions, head
replacement on several architectures, safe checkpoint loading, the image sources, the cached
pixels and their transforms, and BatchNorm in frozen layers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from adaptune import strategies, training
from adaptune.data import read_split, run_prepare_data
from adaptune.data_info import DataInfo
from adaptune.errors import ConfigError, DataError, ModelError, PlanError
from adaptune.evaluation import predict
from adaptune.importance import calibration_batches, layer_table, score_model
from adaptune.modalities import loader
from adaptune.modalities.image import MODALITY as IMAGE
from adaptune.modalities.image.models import (
    build_backbone,
    load_in_order,
    model_transform,
    read_weights,
    replace_head,
)
from adaptune.modalities.image.sources import (
    encode_images,
    load_image_csv,
    load_image_folder,
    to_rgb_uint8,
)
from adaptune.modalities.image.transforms import ImageTransform, image_tensor
from adaptune.plans import Plan, ScoreTables, TensorPlan
from adaptune.settings import DataSettings, ModelSettings, TrainSettings

from .conftest import DEVICES


def load(model_dir, info: DataInfo, seed: int = 0):
    """A saved image model with a new head, as the image modality bound to ``info`` loads a
    pretrained one."""
    return IMAGE.bind(info).load_pretrained(ModelSettings.from_config(f"path:{model_dir}"), seed)


def settings(**values) -> TrainSettings:
    return TrainSettings.from_config(values)


SPLITS = ("train", "val", "test")


def preprocess(image: np.ndarray, transform: ImageTransform) -> torch.Tensor:
    """A raw RGB image through the cache and the evaluation transform, as the pipeline does."""
    cached = encode_images(pd.DataFrame({"image": [image]}), transform).iloc[0]
    return image_tensor(cached["image"], cached["height"], cached["width"], transform)


def test_bundled_efficientnet_lite0_predicts_imagenet_classes():
    """The package's tensors, mapped by position into timm's efficientnet_lite0, classify
    scikit-learn's two sample photos as ImageNet's palace (698) and daisy (985)."""
    from sklearn.datasets import load_sample_image

    model = build_backbone("bundled:efficientnet-lite0").eval()
    transform = model_transform("bundled:efficientnet-lite0", model=model)
    assert transform.input_size == (224, 224) and transform.interpolation == "bicubic"
    batch = torch.stack(
        [preprocess(load_sample_image(name), transform) for name in ("china.jpg", "flower.jpg")]
    )
    with torch.no_grad():
        probabilities = model(batch).softmax(-1)
    assert probabilities.argmax(-1).tolist() == [698, 985]
    assert (probabilities.max(-1).values > 0.1).all()  # 100 times chance


def test_in_order_loading_checks_count_and_every_shape():
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False)
    state = dict(model.state_dict())
    load_in_order(model, {f"t{i}": v.clone() for i, v in enumerate(state.values())}, "ok")
    with pytest.raises(ModelError, match=r"tensors, but the model has"):
        load_in_order(model, dict(list(state.items())[:-1]), "short.pth")
    name = next(k for k, v in state.items() if v.ndim == 4)
    with pytest.raises(ModelError, match=rf"tensor 0 has shape .* model's {name} has"):
        load_in_order(model, {**state, name: torch.zeros(1, 1, 1, 1)}, "wrong.pth")


class Payload:
    """Not a tensor: unpickling it would run code."""


def test_weights_are_read_without_unpickling_code(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "nested.pth")
    assert torch.equal(read_weights(tmp_path / "nested.pth")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "payload": Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(ModelError, match=r"weights_only=True"):
        read_weights(tmp_path / "pickled.pth")
    with pytest.raises(ModelError, match=r"does not exist"):
        read_weights(tmp_path / "absent.safetensors")


def _torchvision(name):
    from torchvision.models import get_model

    return get_model(name, weights=None)


def _timm(name):
    import timm

    return timm.create_model(name, pretrained=False)


def _plain_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 100)
    )


@pytest.mark.parametrize(
    ("build", "head"),
    [
        (lambda: _torchvision("resnet18"), ("fc.weight", "fc.bias")),
        (lambda: _torchvision("mobilenet_v3_small"), ("classifier.3.weight", "classifier.3.bias")),
        (lambda: _torchvision("squeezenet1_1"), ("classifier.1.weight", "classifier.1.bias")),
        (lambda: _timm("test_vit"), ("head.weight", "head.bias")),
        (lambda: _timm("test_efficientnet"), ("classifier.weight", "classifier.bias")),
        (_plain_cnn, ("4.weight", "4.bias")),
    ],
    ids=["resnet18", "mobilenet_v3", "squeezenet_conv_head", "timm_vit", "timm_effnet", "plain"],
)
def test_the_classifier_is_found_and_replaced(build, head):
    torch.manual_seed(0)
    model = build()
    size = (160, 160) if "vit" in type(model).__name__.lower() else (64, 64)
    assert replace_head(model, 7, size) == head
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, *size)).shape == (2, 7)


def test_a_model_without_a_classifier_is_refused():
    with pytest.raises(ModelError, match=r"no Linear or Conv2d"):
        replace_head(nn.Sequential(nn.Flatten()), 3, (8, 8))


def test_images_of_every_shape_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_uint8(grey).shape == (3, 4, 3)
    assert (to_rgb_uint8(grey)[..., 2] == grey).all()
    assert to_rgb_uint8(np.zeros((3, 4, 4), np.uint8)).shape == (3, 4, 3)
    with pytest.raises(DataError, match=r"neither grayscale nor RGB"):
        to_rgb_uint8(np.zeros((3, 4, 2), np.uint8))


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """Real digits written as PNG files: 3 classes x 4 images, plus a CSV listing them."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit-files")
    digits = load_digits()
    rows = []
    for label in (0, 1, 2):
        (root / "folder" / f"digit{label}").mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:4]:
            pixels = np.rint(digits.images[i] * 255 / 16).astype(np.uint8)
            path = root / "folder" / f"digit{label}" / f"{i}.png"
            Image.fromarray(pixels, mode="L").save(path)
            rows.append({"file": str(path.relative_to(root)), "digit": f"d{label}"})
    pd.DataFrame(rows).to_csv(root / "images.csv", index=False)
    return root


def image_csv_settings(root, image_column: str) -> DataSettings:
    source = f"csv:{root / 'images.csv'}"
    values = {"source": source, "image_column": image_column, "label_column": "digit"}
    return DataSettings.from_config(values)


def test_image_folder_and_csv_sources_read_the_same_images(digit_files):
    folder = load_image_folder(digit_files / "folder")
    table = load_image_csv(image_csv_settings(digit_files, "file"))
    assert len(folder) == len(table) == 12
    assert sorted(folder["label"].unique()) == ["digit0", "digit1", "digit2"]
    assert all(image.shape == (8, 8, 3) for image in folder["image"])
    assert sorted(i.tobytes() for i in folder["image"]) == sorted(
        i.tobytes() for i in table["image"]
    )
    with pytest.raises(DataError, match=r"no column\(s\) \['path'\]"):
        load_image_csv(image_csv_settings(digit_files, "path"))


def test_a_broken_image_file_is_named(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1 of 1 image\(s\) cannot be decoded: .*broken.png"):
        load_image_folder(tmp_path)


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory, tiny_vision_dir):
    """``prepare_data`` on scikit-learn's digits for the tiny vision model."""
    out = tmp_path_factory.mktemp("digits")
    paths = {name: str(out / f"{name}.parquet") for name in SPLITS}
    info = run_prepare_data(
        DataSettings.from_config({"source": "bundled:digits"}),
        ModelSettings.from_config(f"path:{tiny_vision_dir}"),
        paths,
        str(out / "data.json"),
    )
    return info, {name: read_split(path) for name, path in paths.items()}


def test_digits_are_decoded_once_and_cached_at_their_size(digits_prepared):
    info, splits = digits_prepared
    assert info.modality == "image" and info.num_labels == 10
    assert info.num_examples == 1797 and sum(len(s) for s in splits.values()) == 1797
    assert info.encoding["cached_image_sizes"] == {"min": [8, 8], "max": [8, 8]}
    assert info.encoding["transform"]["input_size"] == [32, 32]
    assert IMAGE.bind(info).transform.input_size == (32, 32)
    train = splits["train"]
    assert {"image", "height", "width", "label", "label_id"} <= set(train.columns)
    assert len(train.iloc[0]["image"]) == 8 * 8 * 3
    stratified = splits["test"]["label"].value_counts(normalize=True)
    assert stratified.between(0.08, 0.12).all()


def test_large_images_are_cached_no_larger_than_the_model_uses():
    transform = ImageTransform((224, 224), 256, (0.5,) * 3, (0.5,) * 3)
    cached = encode_images(pd.DataFrame({"image": [np.zeros((600, 900, 3), np.uint8)]}), transform)
    assert (cached.loc[0, "height"], cached.loc[0, "width"]) == (256, 384)


def test_batches_are_normalised_and_augmentation_is_seeded(digits_prepared):
    info, splits = digits_prepared
    frame = splits["train"].head(6)
    image = IMAGE.bind(info)
    plain = next(image.batches(frame, 6))
    assert plain["pixel_values"].shape == (6, 3, 32, 32)
    assert plain["labels"].tolist() == frame["label_id"].tolist()
    mean = torch.tensor(image.transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(image.transform.std).view(1, 3, 1, 1)
    pixels = plain["pixel_values"] * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.equal(plain["pixel_values"], next(image.batches(frame, 6))["pixel_values"])
    augment = ["random_resized_crop", "horizontal_flip"]

    def augmented(seed, epoch=1, workers=0):
        examples = image.examples(frame, augment, seed)
        examples.set_epoch(epoch)
        return next(iter(loader(examples, 6, workers=workers)))["pixel_values"]

    assert torch.equal(augmented(1), augmented(1))
    assert not torch.equal(augmented(1), augmented(2))
    assert not torch.equal(augmented(1), augmented(1, epoch=2))  # new draws every epoch
    assert not torch.equal(augmented(1), plain["pixel_values"])
    # Draws depend on the seed, the epoch and the example only: workers change nothing.
    assert torch.equal(augmented(1), augmented(1, workers=2))


def test_text_model_on_images_is_refused_before_anything_runs(tmp_path, tiny_bert_dir):
    with pytest.raises(ConfigError, match=r"holds image examples, but model.name = .* for text"):
        run_prepare_data(
            DataSettings.from_config({"source": "bundled:digits"}),
            ModelSettings.from_config(f"path:{tiny_bert_dir}"),
            {name: str(tmp_path / name) for name in SPLITS},
            str(tmp_path / "data.json"),
        )
    assert not list(tmp_path.iterdir())


def plan(model: nn.Module, head: tuple[str, ...], kind: str = "head_only") -> Plan:
    """``head_only`` (the body frozen) or ``full``."""
    return Plan(
        kind,
        kind,
        [
            TensorPlan(
                n, "l", 0, p.numel(), kind != "full" and n not in head, 1.0, "", is_head=n in head
            )
            for n, p in model.named_parameters()
        ],
    )


def batchnorm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_frozen_batchnorm_keeps_its_statistics_unless_told(
    digits_prepared, tiny_vision_dir, mode, device
):
    info, splits = digits_prepared
    task = load(tiny_vision_dir, info)
    before = batchnorm_statistics(task.model)
    train_settings = settings(epochs=1, batch_size=16, lr=1e-2, frozen_batchnorm=mode)
    train = splits["train"].head(32)
    val = splits["val"].head(16)
    device = torch.device(device)
    training.train(task, plan(task.model, task.head), train, val, train_settings, 0, device)
    after = batchnorm_statistics(task.model.cpu())
    unchanged = [torch.equal(before[k], after[k]) for k in before]
    assert len(unchanged) == 2 * 15  # running mean and variance of each of the 15 BatchNorms
    assert all(unchanged) if mode == "eval" else not any(unchanged[:2])


def test_a_finetuned_image_model_saves_and_reloads(digits_prepared, tiny_vision_dir, tmp_path):
    info, splits = digits_prepared
    task = load(tiny_vision_dir, info)
    assert task.head == ("fc.weight", "fc.bias")
    train_settings = settings(epochs=3, batch_size=16, lr=1e-2, augment=["random_resized_crop"])
    result = training.train(
        task,
        plan(task.model, task.head, "full"),
        splits["train"].head(160),
        splits["val"],
        train_settings,
        0,
        torch.device("cpu"),
    )
    assert result.best_val_macro_f1 > 0.4  # ten classes: chance is 0.1
    task.modality.save(task, tmp_path, ModelSettings.from_config(f"path:{tiny_vision_dir}"))
    saved = json.loads((tmp_path / "adaptune_model.json").read_text())
    assert saved["name"] == "timm:test_resnet" and saved["labels"] == list(info.labels)
    assert saved["transform"] == info.encoding["transform"]
    val = splits["val"].head(20)
    logits = predict(task, val, 8, torch.device("cpu"))
    reloaded = predict(task.modality.load_finetuned(tmp_path), val, 8, torch.device("cpu"))
    np.testing.assert_allclose(reloaded, logits, atol=1e-5)


STRATEGIES = {
    "full": {"kind": "full"},
    "head_only": {"kind": "head_only"},
    "freeze_bottom": {"kind": "freeze_bottom", "layers": 2},
    "llrd": {"kind": "llrd", "decay": 0.8},
    "importance": {
        "kind": "importance",
        "metric": "combined",
        "freeze": {"budget": 0.3},
        "lr": {"mapping": "rank", "min": 0.1, "max": 2.0},
    },
    "gradual_unfreeze": {"kind": "gradual_unfreeze", "every": 1},
    "fastai_fine_tune": {"kind": "fastai_fine_tune", "frozen_epochs": 1},
    "auto_rgn": {"kind": "auto_rgn"},
    "childtuning_d": {"kind": "childtuning_d", "p": 0.3},
    "lora": {"kind": "lora", "r": 4, "targets": ["layer4.0.conv2"]},
    "lp_ft": {"kind": "lp_ft", "probe_epochs": 1},
    "lisa": {"kind": "lisa", "layers": 2, "interval_fraction": 0.25},
    "lisa_importance": {"kind": "lisa_importance", "layers": 2, "interval_fraction": 0.25},
    "badam": {"kind": "badam", "interval_fraction": 0.2},
    "sparse_mask": {"kind": "sparse_mask", "density": 0.1},
    "hft": {"kind": "hft"},
    "progressive_freeze": {"kind": "progressive_freeze", "threshold": 10.0},
}


@pytest.fixture(scope="module")
def cnn_scores(digits_prepared, tiny_vision_dir):
    """Every importance metric of the tiny CNN on real digits."""
    from adaptune.config import metric_names

    info, splits = digits_prepared
    task = load(tiny_vision_dir, info)
    calibration = calibration_batches(task.modality, splits["train"], 1, 8, seed=0)
    scores, _ = score_model(task, calibration, metric_names(), probes=2)
    return ScoreTables(scores, layer_table(scores))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_trains_an_image_model(digits_prepared, tiny_vision_dir, cnn_scores, name):
    info, splits = digits_prepared
    assert cnn_scores.tensors.notna().all().all()
    plan_ = strategies.build_plan(cnn_scores, name, STRATEGIES[name])
    task = load(tiny_vision_dir, info)
    result = training.train(
        task,
        plan_,
        splits["train"].head(24),
        splits["val"].head(16),
        settings(epochs=2, batch_size=8, lr=1e-2),
        0,
        torch.device("cpu"),
    )
    assert len(result.history) == 2 and np.isfinite(result.history["train_loss"]).all()
    assert 0 < result.trainable_params <= sum(p.numel() for p in task.model.parameters())


def test_lora_names_a_module_the_model_lacks(digits_prepared, tiny_vision_dir, cnn_scores):
    info, splits = digits_prepared
    spec = {"kind": "lora", "targets": ["layer9.conv"]}
    plan_ = strategies.build_plan(cnn_scores, "lora", spec)
    task = load(tiny_vision_dir, info)
    with pytest.raises(PlanError, match=r"lora: cannot adapt \['layer9.conv'\]"):
        training.train(
            task,
            plan_,
            splits["train"].head(8),
            splits["val"].head(8),
            settings(epochs=1),
            0,
            torch.device("cpu"),
        )
