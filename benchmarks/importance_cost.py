"""Cost of each importance metric against one epoch of full fine-tuning on the same few-shot
split, at the settings of a config (default: config/config.yaml, the bundled MiniLM on BBC News;
config/vision.yaml measures EfficientNet-Lite0 on digits).

    python benchmarks/importance_cost.py [--config config/config.yaml] [--threads 2] [--shots 16]

Prints a markdown table: seconds per metric, the ratio to one training epoch, and the process's
peak resident memory after each metric (it only grows).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import yaml

from adaptune import config as schema
from adaptune import modalities, strategies, training
from adaptune.data import prepare, sample_few_shot
from adaptune.importance import METRICS, calibration_batches, layer_table, score_model
from adaptune.plans import ScoreTables
from adaptune.settings import DataSettings, ImportanceSettings, ModelSettings, TrainSettings


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=Path(__file__).parents[1] / "config" / "config.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = schema.check_schema(yaml.safe_load(Path(args.config).read_text()))
    data = DataSettings.from_config(config["data"])
    importance = ImportanceSettings.from_config(config["importance"])
    model = ModelSettings.from_config(config["model"])
    model_name = model.name

    splits, info = prepare(data, model)
    modality = modalities.for_data(info)
    few = sample_few_shot(splits["train"], args.shots, data.seed)
    batches = calibration_batches(
        modality, few, importance.batches, importance.batch_size, importance.seed
    )
    options = {
        "probes": importance.hutchinson_probes,
        "hessian_examples": importance.hessian_examples,
        "chunk_size": importance.chunk_size,
        "per_example": importance.per_example,
        "seed": importance.seed,
        "combine": importance.combine,
    }
    rows = []
    for name in [m for m in METRICS if m in importance.metrics]:
        task = modality.load_pretrained(model, importance.seed)
        _, seconds = score_model(task, batches, [name], **options)
        rows.append((name, seconds[name], peak_rss_mb()))
    task = modality.load_pretrained(model, importance.seed)
    _, seconds = score_model(task, batches, importance.metrics, **options)
    together = sum(seconds.values())

    task = modality.load_pretrained(model, 0)
    scores, _ = score_model(task, batches[:1], ["weight_l2"])
    plan = strategies.build_plan(ScoreTables(scores, layer_table(scores)), "full", {"kind": "full"})
    epoch = TrainSettings.from_config({**config["train"], "epochs": 1})
    start = time.perf_counter()
    result = training.train(task, plan, few, few.head(8), epoch, 0, torch.device("cpu"))
    epoch_seconds = result.train_seconds
    wall = time.perf_counter() - start

    examples = importance.batches * importance.batch_size
    print(
        f"\nmodel {model_name}, {args.shots} shots x {info.num_labels} classes "
        f"({len(few)} examples), {info.modality} input "
        f"{info.encoding.get('transform', {}).get('input_size') or f'max_length {data.max_length}'}"
        ", "
        f"{args.threads} threads"
    )
    print(
        f"calibration: {importance.batches} batches x {importance.batch_size} = {examples} "
        f"examples; Hutchinson: {importance.hutchinson_probes} probes on "
        f"{importance.hessian_examples} examples; per-example gradients: {importance.per_example}"
    )
    print(
        f"one epoch of full fine-tuning: {epoch_seconds:.1f} s of training "
        f"({wall:.1f} s with its validation pass)\n"
    )
    print("| metric | seconds | x one epoch | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for name, seconds, rss in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / epoch_seconds:.2f} | {rss:,.0f} |")
    print(
        f"| **all, one scoring run** | {together:.2f} | {together / epoch_seconds:.2f} | "
        f"{peak_rss_mb():,.0f} |"
    )
    print("\n(grad_norm shares fisher's per-example pass when both run, as in the pipeline)")


if __name__ == "__main__":
    main()
