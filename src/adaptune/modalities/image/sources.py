"""Image sources and the decoded-image cache.

``data.source`` for images is ``bundled:digits`` (scikit-learn's digits), ``imagefolder:DIR``
(``DIR/<class>/<image>``), ``torchvision:DATASET`` or ``csv:PATH`` with ``data.image_column``.
Each is read into a table with ``item`` (where the image came from), ``image`` (a decoded RGB
``uint8`` array, grayscale replicated to three channels) and ``label``. ``prepare_data`` then
caches each image no larger than the model's resize size, as raw bytes with its ``height`` and
``width`` (:func:`encode_images`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as F

from adaptune.errors import DataError
from adaptune.modalities.files import local_file, read_csv
from adaptune.modalities.image.catalog import BUNDLED_SOURCES, IMAGE_EXTENSIONS
from adaptune.modalities.image.transforms import ImageTransform
from adaptune.settings import DataSettings

log = logging.getLogger(__name__)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixels of any depth as 8 bits: 16-bit images scaled down (not clipped to white), floats
    in [0, 1] scaled up."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        return np.rint(np.clip(array / top, 0, 1) * 255).astype(np.uint8)
    top = array.max(initial=0)
    if top <= 255:
        return array.astype(np.uint8)
    bits = 16 if top <= 65535 else int(np.ceil(np.log2(float(top) + 1)))
    return (array.astype(np.float64) * (255 / (2**bits - 1))).round().astype(np.uint8)


def to_rgb_uint8(image: Any) -> np.ndarray:
    """An RGB ``uint8`` array (height, width, 3) from a PIL image or an array: grayscale,
    palette, RGBA, CMYK and 16-bit or float images converted."""
    if hasattr(image, "convert"):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            image = np.asarray(image)  # high bit depth: scaled below, as PIL would clip
        else:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = _to_uint8(np.asarray(image))
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


def open_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return to_rgb_uint8(image)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from err


SHOWN_UNREADABLE = 10  # unreadable images named in a message; data.json keeps up to 100


def decode_images(table: pd.DataFrame, files: list[Path], policy: str, where: str) -> pd.DataFrame:
    """``table`` (one row per file of ``files``) with each image decoded into ``image``. Every
    file is tried: with ``policy`` "error" (``data.unreadable_images``) the DataError names
    all that cannot be decoded at once; with "skip" their rows are left out, the log names
    them, and the returned table's ``attrs["unreadable_images"]`` counts them (for
    data.json)."""
    images, unreadable = [], []
    for path in files:
        try:
            images.append(open_image(path))
        except DataError as err:
            images.append(None)
            unreadable.append(f"{path}: {str(err.__cause__ or err).splitlines()[0]}")
    if unreadable and policy != "skip":
        shown = "; ".join(unreadable[:SHOWN_UNREADABLE])
        more = len(unreadable) - SHOWN_UNREADABLE
        raise DataError(
            f"{where}: {len(unreadable)} of {len(files)} image(s) cannot be decoded: {shown}"
            f"{f'; and {more} more' if more > 0 else ''}. Replace or remove them, or set "
            "data.unreadable_images: skip to leave them out (counted in data.json)"
        )
    for line in unreadable:
        log.warning("%s: skipped (data.unreadable_images: skip): %s", where, line)
    kept = table.assign(image=images)[[image is not None for image in images]]
    kept.attrs["unreadable_images"] = {"count": len(unreadable), "files": unreadable[:100]}
    return kept.reset_index(drop=True)


def image_folder_files(root: Path) -> list[tuple[str, Path]]:
    """(class, file) of every image in ``ROOT/<class>/...`` (torchvision's ImageFolder
    layout); a class folder without images is skipped, with a warning."""
    if not root.is_dir():
        raise DataError(f"data.source imagefolder: {root.resolve()} is not a folder")
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = [
            p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not images:
            log.warning("%s: no images in class folder %r; the class is skipped", root, folder.name)
        found += [(folder.name, path) for path in images]
    if not found:
        raise DataError(f"{root}: no images in class subfolders (ImageFolder layout)")
    return found


def load_image_folder(root: str | Path, unreadable: str = "error") -> pd.DataFrame:
    """``ROOT/<class>/<image>`` (torchvision's ImageFolder layout); ``unreadable``: what to do
    with images that cannot be decoded (:func:`decode_images`)."""
    root = Path(root)
    files = image_folder_files(root)
    table = pd.DataFrame(
        {
            "item": [str(path.relative_to(root)) for _, path in files],
            "label": [label for label, _ in files],
        }
    )
    frame = decode_images(table, [path for _, path in files], unreadable, str(root))
    return frame[["item", "image", "label"]]


def image_csv(settings: DataSettings) -> pd.DataFrame:
    """The rows of a CSV of image paths: ``item`` (the path as written), ``file`` (relative to
    the CSV's folder) and ``label``; a missing image file is an error."""
    path = local_file(settings)
    image_column, label_column = settings.image_column, settings.label_column
    frame = read_csv(path, settings.encoding, [image_column, label_column], settings.separator)
    missing = [c for c in (image_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"csv:{path}: no column(s) {missing}; its columns are {list(frame.columns)} "
            f"({frame.attrs['separator']}). Set data.image_column and data.label_column, or "
            "data.separator."
        )
    files = [Path(p) if Path(p).is_absolute() else path.parent / p for p in frame[image_column]]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DataError(f"csv:{path}: {len(absent)} image file(s) missing, e.g. {absent[:3]}")
    return pd.DataFrame({"item": frame[image_column], "file": files, "label": frame[label_column]})


def load_image_csv(settings: DataSettings) -> pd.DataFrame:
    """A CSV with an image-path column (relative paths are relative to the CSV's folder)."""
    table = image_csv(settings)
    files = list(table.pop("file"))
    frame = decode_images(table, files, settings.unreadable_images, settings.source)
    return frame[["item", "image", "label"]]


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


def load_images(settings: DataSettings) -> pd.DataFrame:
    """The image source named by ``data.source``: a table with ``item``, ``image`` (decoded RGB
    arrays) and ``label``."""
    kind, location = settings.kind, settings.location
    if kind == "bundled":
        if location not in BUNDLED_SOURCES:
            raise DataError(
                f"data.source = {settings.source!r}: the bundled image source is digits"
            )
        return load_digits_images()
    if kind == "imagefolder":
        return load_image_folder(location, settings.unreadable_images)
    if kind == "torchvision":
        return load_torchvision_dataset(location, settings.root)
    if kind == "csv":
        return load_image_csv(settings)
    raise DataError(f"data.source = {settings.source!r} is not an image source")


def shrink(image: np.ndarray, shorter_side: int, transform: ImageTransform) -> np.ndarray:
    """Downscale so the shorter side is ``shorter_side`` (never upscales): the cache keeps no
    more pixels than the model's transform will use."""
    height, width = image.shape[:2]
    if min(height, width) <= shorter_side:
        return image
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    resized = F.resize(tensor, shorter_side, interpolation=transform.mode, antialias=True)
    return resized.permute(1, 2, 0).contiguous().numpy()


def encode_images(frame: pd.DataFrame, transform: ImageTransform) -> pd.DataFrame:
    """Replace the decoded arrays by the cached form stored in the split tables: raw bytes of
    the (shrunk) RGB array plus its ``height`` and ``width``."""
    images = [shrink(image, transform.resize_size, transform) for image in frame["image"]]
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
