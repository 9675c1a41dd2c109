"""The ``fetch`` stage: download a hub dataset or pretrained weights once, where there is a
network (it runs in the submitting process), so that compute jobs, on cluster nodes without
internet, load them from the local caches.

It loads the data and the model exactly as the stages that need them do (the modality's own
loaders), so every cache they read is filled: the Hugging Face hub and datasets caches, torch
hub's. Those caches must be on a file system the compute nodes share (``HF_HOME``,
``TORCH_HOME``). Jobs started by a cluster executor then run with the hub offline
(:func:`offline_environment`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from pathlib import Path

from adaptune import modalities
from adaptune.data_info import DataInfo
from adaptune.settings import DataSettings, ModelSettings

log = logging.getLogger(__name__)

# Set in jobs that run after a fetch: Hugging Face libraries then read only their caches.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_fetch(data: DataSettings, model: ModelSettings, out: str | Path) -> dict:
    """Load ``data`` and ``model`` once (downloading what they need) and write what was fetched
    to ``out``."""
    modality = modalities.choose(data, model)
    examples = modality.load_examples(data)
    labels = sorted(str(label) for label in examples["label"].unique())
    # encode fetches what preparing the data needs of the model (a tokenizer, a transform)
    _, encoding = modality.encode({"train": examples.head(8)}, data, model)
    info = DataInfo.for_labels(modality.name, labels, **encoding)
    task = modality.bind(info).load_pretrained(model, 0)
    fetched = {
        "source": data.source,
        "revision": data.revision,
        "model": model.name,
        "weights": model.weights,
        "examples": len(examples),
        "labels": labels,
        "parameters": sum(p.numel() for p in task.model.parameters()),
    }
    Path(out).write_text(json.dumps(fetched, indent=2) + "\n")
    log.info("fetched %s (%d examples) and %s", data.source, len(examples), model.name)
    return fetched


def offline_environment(environ: MutableMapping[str, str]) -> None:
    """Hub offline for the processes that ``environ`` starts (a user's own settings win)."""
    for name, value in OFFLINE.items():
        environ.setdefault(name, value)
