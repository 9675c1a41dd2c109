"""Distribution shifts of a test split: seeded perturbations that ask how a fine-tuned model
generalises beyond the distribution it was trained on.

Each modality lists its own shift kinds (``Modality.shifts``: text perturbations in
:mod:`adaptune.modalities.text.shifts`, image corruptions in
:mod:`adaptune.modalities.image.shifts`), each a function of one example, a severity from 1
(mild) to 5 (strong) and a random generator. Every example's generator is seeded by the shift
seed, the kind, the severity and the example's id alone: a shifted split is the same whatever
the order of the rows, the machine or the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Shift:
    """One kind of shift: ``family`` groups kinds (noise, blur, typos, ...) in the reports;
    ``apply(example, severity, rng)`` returns the shifted example."""

    name: str
    family: str
    description: str
    apply: Callable[[Any, int, np.random.Generator], Any]


def shift_name(kind: str, severity: int) -> str:
    """How a shifted split is named in files, metrics and tables: ``gaussian_blur-s3``."""
    return f"{kind}-s{severity}"


def parse_shift_name(name: str) -> tuple[str, int]:
    """The kind and severity of a shift's name (the inverse of :func:`shift_name`)."""
    kind, _, severity = name.rpartition("-s")
    return kind, int(severity)


def example_rng(seed: int, kind: str, severity: int, example_id: object) -> np.random.Generator:
    """The generator of one example's perturbation (see the module docstring)."""
    key = hashlib.sha256(f"{seed}\x1f{kind}\x1f{severity}\x1f{example_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:16], "little"))


def at_severity(values: tuple[float, ...], severity: int) -> float:
    """The parameter of ``severity`` (1-5) from a shift's five-step table."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is not one of {SEVERITIES}")
    return values[severity - 1]


def perturbed(
    inputs: Iterable[Any], ids: Iterable[object], shift: Shift, severity: int, seed: int
) -> list[Any]:
    """Every input with ``shift`` at ``severity`` applied, each from its own generator."""
    return [
        shift.apply(value, severity, example_rng(seed, shift.name, severity, example_id))
        for value, example_id in zip(inputs, ids, strict=True)
    ]
