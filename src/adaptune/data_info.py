"""``data.json``, the contract between ``prepare_data`` and every later stage, as a typed value.

``prepare_data`` writes it beside the splits; every stage that reads the splits reads it once,
with :meth:`DataInfo.read`, and binds the modality it names to it
(:func:`adaptune.modalities.for_data`): later code asks that modality for examples, models and
saving, and never passes the file's contents along.

The file stays one flat JSON object: the keys every modality writes (below) and, beside them,
the keys of the modality's own encoding (text: ``max_length``, ``pad_token_id``; images:
``transform``, ``cached_image_sizes``), which :attr:`DataInfo.encoding` holds and the modality
reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

from adaptune.errors import DataError


@dataclass(frozen=True)
class DataInfo:
    """What ``prepare_data`` found and did: the source, its modality, the class names (sorted:
    a class's id is its position), counts, content fingerprints, and the modality's encoding
    (``encoding``: how its examples were made into model inputs)."""

    modality: str
    labels: tuple[str, ...]
    source: str = ""
    fingerprint: str = ""
    source_fingerprint: str = ""
    source_version: str = ""
    num_examples: int = 0
    duplicates: Mapping[str, Any] = field(default_factory=dict)
    # images left out as undecodable (data.unreadable_images: skip): count, files; {} for text
    unreadable_images: Mapping[str, Any] = field(default_factory=dict)
    class_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    encoding: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``data.json`` holds."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "encoding"}
        return {
            **own,
            "labels": list(self.labels),
            "num_labels": self.num_labels,
            **self.encoding,
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "data.json") -> Self:
        own = {f.name for f in fields(cls)} - {"encoding"}
        try:
            return cls(
                **{k: v for k, v in values.items() if k in own and k != "labels"},
                labels=tuple(values["labels"]),
                encoding={k: v for k, v in values.items() if k not in own | {"num_labels"}},
            )
        except (KeyError, TypeError) as err:
            raise DataError(
                f"{where} is not a data.json that prepare_data wrote ({err}); rerun prepare_data"
            ) from err

    @classmethod
    def read(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: cannot read data.json ({err}); rerun prepare_data") from err
        return cls.from_dict(values, str(path))

    @classmethod
    def for_labels(cls, modality: str, labels: Sequence[str], **encoding: Any) -> Self:
        """The data facts a model needs when there is no prepared data (a notebook, a test):
        the modality, the class names and the encoding keys."""
        return cls(modality=modality, labels=tuple(labels), encoding=encoding)
