"""``hft``: Half Fine-Tuning (Hui et al., ACL 2024, arXiv 2404.18466): in every layer of the
pretrained body, a seeded random half of the weight matrices of each category (attention,
normalisation, other: feed-forward layers, convolutions, embeddings; from the module tree,
:func:`adaptune.layers.tensor_categories`) is frozen for the whole run and the other half
trains; the new head trains. A control for "does the choice matter at all": it trains half
the body, chosen by chance, not by importance.

The units are modules (a linear layer's weight and bias are frozen together; a tensor held
directly by the model, as ViT's position embedding, is its own unit). Rounding: a category with
``c`` units in a layer freezes ``floor(c / 2)`` of them, plus one more in the first, third,
fifth, ... layer (counted from the input up, per category) where ``c`` is odd; so over the
body each category freezes exactly half of its units, rounded up when its count is odd. The
choice within a layer is ``numpy.random.default_rng(seed)``'s, drawn layer by layer in forward
order and within a layer attention, norm, other; the plan lists every tensor's fate. HFT
defines its halves on a transformer's blocks; here the input and output layers are halved by
the same rule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaptune.errors import PlanError
from adaptune.layers import ATTENTION, NORM, OTHER
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import StrategyKind

CATEGORIES = (ATTENTION, NORM, OTHER)


@dataclass(frozen=True)
class HftSettings:
    seed: int


def unit_of(name: str) -> str:
    """The module a tensor belongs to (its name without the last part), or the tensor itself
    where the model holds it directly."""
    return name.rpartition(".")[0] or name


def frozen_units(tables: ScoreTables, seed: int) -> set[str]:
    """The units HFT freezes (see the module docstring)."""
    scores = tables.tensors
    if "category" not in scores.columns:
        raise PlanError(
            "hft: the score table has no 'category' column (made by an older adaptune); "
            "rerun score_importance"
        )
    body = scores[~scores["is_head"]].assign(unit=lambda t: t["name"].map(unit_of))
    rng = np.random.default_rng(seed)
    odd_seen = dict.fromkeys(CATEGORIES, 0)
    frozen: set[str] = set()
    for _, layer in body.groupby("layer_index", sort=True):
        for category in CATEGORIES:
            units = list(dict.fromkeys(layer.loc[layer["category"] == category, "unit"]))
            count = len(units) // 2
            if len(units) % 2:
                count += int(odd_seen[category] % 2 == 0)
                odd_seen[category] += 1
            if count:
                frozen.update(
                    units[i] for i in sorted(rng.choice(len(units), count, replace=False))
                )
    return frozen


def build(tables: ScoreTables, settings: HftSettings) -> list[TensorPlan]:
    frozen = frozen_units(tables, settings.seed)
    tensors = []
    for row in tables.rows():
        if row.is_head:
            tensors.append(TensorPlan.from_row(row, False, 1.0, "head: new for the task"))
            continue
        unit = unit_of(row.name)
        half = f"hft ({row.category} of {row.layer}, seed {settings.seed})"
        if unit in frozen:
            tensors.append(TensorPlan.from_row(row, True, 0.0, f"{half}: in the frozen half"))
        else:
            tensors.append(TensorPlan.from_row(row, False, 1.0, f"{half}: in the trained half"))
    return tensors


KIND = StrategyKind(name="hft", build=build, settings=HftSettings, needs_head=True)
