"""Shared fixtures: a tiny BERT the tests build themselves, small real data, and a helper that
runs the workflow in a copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# Tests that train run on the CPU and, where one is present, on a CUDA GPU too.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    ),
]
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "envs", "profiles", "report")
CLUSTER_TESTS = "ADAPTUNE_CLUSTER_TESTS"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cluster`` start daemons as root and take minutes: they are skipped unless
    asked for, with ``pytest -m cluster`` or ``ADAPTUNE_CLUSTER_TESTS=1``."""
    if "cluster" in (config.getoption("markexpr") or "") or os.environ.get(CLUSTER_TESTS) == "1":
        return
    skip = pytest.mark.skip(reason=f"cluster test: run with pytest -m cluster or {CLUSTER_TESTS}=1")
    for item in items:
        if item.get_closest_marker("cluster"):
            item.add_marker(skip)


def save_tiny_bert(directory: Path, hidden_size: int = 32, max_positions: int = 128) -> Path:
    """A randomly initialised 2-block BERT with the bundled MiniLM tokenizer, saved in
    ``directory`` as a Hugging Face folder without a classification head, like a pretrained
    encoder (also used by benchmarks/)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptune.modalities.text.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("bundled:all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_news_sample(path: Path) -> Path:
    """24 real BBC News articles per topic (first 400 characters), with other column names
    than the default ones (``body``, ``topic``)."""
    from adaptune.modalities.text.sources import load_bbc_news

    frame = load_bbc_news().groupby("label").head(24)
    frame["text"] = frame["text"].str.slice(0, 400)
    frame.rename(columns={"text": "body", "label": "topic"}).to_csv(path, index=False)
    return path


def news_sample_config(model_dir: Path, csv: Path, experiment: str) -> dict:
    """The tiny BERT on :func:`save_news_sample`'s CSV, one strategy and the TF-IDF baseline."""
    config = tiny_config(model_dir, experiment=experiment)
    config["data"] = {
        "source": f"csv:{csv}",
        "text_column": "body",
        "label_column": "topic",
        "shots": [4],
        "max_length": 32,
    }
    config["strategies"] = {"head_only": {"kind": "head_only", "train": {"lr": 1e-3}}}
    return config


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`save_tiny_bert`: hidden size 32."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's 0.47M-parameter ``test_resnet`` (BatchNorm, four stages), randomly initialised and
    saved as adaptune saves an image model, with a 32x32 input transform: a ``path:`` model that
    trains in seconds on the CPU."""
    import timm

    from adaptune.modalities.image.models import save_classifier
    from adaptune.modalities.image.transforms import ImageTransform

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    transform = ImageTransform((32, 32), 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    directory = tmp_path_factory.mktemp("tiny-vision")
    labels = [str(i) for i in range(model.num_classes)]
    save_classifier(model, directory, "timm:test_resnet", labels, transform.to_dict())
    return directory


@pytest.fixture(scope="session")
def bbc_sample_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`save_news_sample`."""
    return save_news_sample(tmp_path_factory.mktemp("data") / "news.csv")


def tiny_task(model_dir: Path, labels: list[str], seed: int = 0):
    """The tiny BERT with a new head for ``labels``, as the text modality loads it."""
    from adaptune.modalities.text import MODALITY
    from adaptune.settings import ModelSettings

    return MODALITY.load_pretrained(
        ModelSettings.from_config(f"path:{model_dir}"), labels, seed, {}
    )


def tiny_batches(model_dir: Path, labels: int = 3, count: int = 2, size: int = 4) -> list[dict]:
    """Random token batches for a model of the tiny BERT's vocabulary."""
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(5, 1000, (size, 12), generator=generator),
            "attention_mask": torch.ones(size, 12, dtype=torch.long),
            "labels": torch.randint(0, labels, (size,), generator=generator),
        }
        for _ in range(count)
    ]


# Four one-thread jobs at once: on two cores, one job's process start overlaps another's work.
PARALLEL = ("--cores", "4", "--set-threads", "finetune=1", "evaluate=1", "score_importance=1")


class Workflow:
    """A copy of the workflow in a temporary folder, with its own config and results."""

    def __init__(self, root: Path, config: dict) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for name in WORKFLOW_FILES:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, root / name)
            else:
                shutil.copy(source, root / name)
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        (self.root / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def config(self) -> dict:
        return yaml.safe_load((self.root / "config" / "config.yaml").read_text())

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run snakemake as a subprocess (so that the workflow profile applies)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            env=env,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def dry_run_jobs(self, *args: str) -> dict[str, int]:
        """Jobs a dry run would execute, by rule, from its "Job stats" table: {} for none."""
        lines = self.run("-n", *args).stdout.splitlines()
        if "Job stats:" not in lines:
            assert "Nothing to be done" in "\n".join(lines), lines[-20:]
            return {}
        jobs: dict[str, int] = {}
        for line in lines[lines.index("Job stats:") + 3 :]:
            if not line.strip() or line.startswith("total"):
                break
            rule, count = line.split()
            jobs[rule] = int(count)
        return jobs

    def results(self, experiment: str) -> Path:
        return self.root / "results" / experiment


def tiny_config(model_dir: Path, experiment: str = "tiny", **data: object) -> dict:
    """A config that runs every stage in seconds: the tiny BERT on 4 real articles per class."""
    return {
        "experiment": experiment,
        "data": {"source": "bundled:bbc-news", "shots": [4], "max_length": 32, **data},
        "model": {"name": f"path:{model_dir}"},
        "importance": {"batches": 1, "batch_size": 8},
        "strategies": {
            "full": {"kind": "full"},
            "head_only": {"kind": "head_only", "train": {"lr": 1e-3}},
        },
        "baselines": ["tfidf_logreg"],
        "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 128, "seeds": [0]},
        "mlflow": {"tracking_uri": "sqlite:///results/mlflow.db"},
    }


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
