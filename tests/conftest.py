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

from .decoders import FAMILIES

REPO = Path(__file__).resolve().parents[1]
# Tests that train run on the CPU and, where one is present, on a CUDA GPU too.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    ),
]
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "envs", "profiles", "report")
# Opt-in markers: skipped unless asked for with ``pytest -m MARKER`` or the variable set to 1.
#   cluster: starts a single-node SLURM cluster as root (minutes);
#   slow: a second end-to-end run of what a faster test already covers, or a full-sized model.
OPT_IN = {"cluster": "ADAPTUNE_CLUSTER_TESTS", "slow": "ADAPTUNE_SLOW_TESTS"}
CLUSTER_TESTS = OPT_IN["cluster"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of an :data:`OPT_IN` marker are skipped unless asked for (the default suite is
    what CI runs in minutes; the lead runs the rest before an issue is resolved)."""
    asked = config.getoption("markexpr") or ""
    for marker, variable in OPT_IN.items():
        if marker in asked or os.environ.get(variable) == "1":
            continue
        reason = f"{marker} test: run with pytest -m {marker} or {variable}=1"
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if item.get_closest_marker(marker):
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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tests on tiny models: they gain nothing from a second,
    and on a machine shared with other jobs two spinning threads made a tiny decoder's training
    run 50 times slower (15 s against 0.29 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def decoder_tokenizer() -> object:
    """The byte-level BPE the tiny decoders share (:func:`tests.decoders.train_tokenizer`)."""
    from .decoders import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session", params=tuple(FAMILIES))
def tiny_decoder_dir(request, tmp_path_factory, decoder_tokenizer) -> Path:
    """A tiny random decoder LM of each family in :data:`tests.decoders.FAMILIES` (Llama,
    Qwen2, GPT-2, GPT-NeoX), saved as a ``path:`` model folder with no pad token; tests that
    take it run once per family."""
    from .decoders import save_tiny_decoder

    return save_tiny_decoder(
        tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, decoder_tokenizer
    )


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


TINY_VIT = "test_vit"  # timm's 0.37M-parameter ViT: 6 blocks of width 64, 16-pixel patches


@pytest.fixture(scope="session")
def tiny_vit_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's ``test_vit`` (class token, absolute position embeddings for 160 x 160 inputs),
    randomly initialised and saved as a user gives weights: a safetensors file for
    ``model.name: timm:test_vit`` with ``model.weights: FILE``."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_VIT, pretrained=False)
    path = tmp_path_factory.mktemp("tiny-vit") / f"{TINY_VIT}.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def bbc_sample_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`save_news_sample`."""
    return save_news_sample(tmp_path_factory.mktemp("data") / "news.csv")


def tiny_task(model_dir: Path, labels: list[str], seed: int = 0, max_length: int = 32):
    """The tiny BERT with a new head for ``labels``, as the text modality loads it (bound to
    data of those labels, padded with the MiniLM tokenizer's pad token, 0)."""
    from adaptune.data_info import DataInfo
    from adaptune.modalities.text import MODALITY
    from adaptune.settings import ModelSettings

    info = DataInfo.for_labels("text", labels, pad_token_id=0, max_length=max_length)
    return MODALITY.bind(info).load_pretrained(ModelSettings.from_config(f"path:{model_dir}"), seed)


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
