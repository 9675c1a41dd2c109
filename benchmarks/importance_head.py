"""Importance through a random head against importance through a probed head (``importance.head``)
at the settings of a config (default: config/config.yaml, the bundled MiniLM on BBC News;
config/vision.yaml measures EfficientNet-Lite0 on digits).

    python benchmarks/importance_head.py [--config config/config.yaml] [--threads 2] [--shots 16]
        [--plans config/compare.yaml]

For each head: the seconds of the probe and of scoring, the probed head's loss and accuracy on
the training split, and the share of each gradient metric's total that falls on the head (for
grad_norm, of the squared norm, which adds up over tensors). Then the Spearman correlation of
the body tensors' scores under the two heads, and the plans that the importance strategies of
``--plans`` make from each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from adaptune import config as schema
from adaptune import modalities, strategies
from adaptune.data import prepare, sample_few_shot
from adaptune.devices import select_device
from adaptune.importance import calibration_batches, layer_table, score_model
from adaptune.plans import ScoreTables
from adaptune.scoring import probe_head
from adaptune.settings import DataSettings, ImportanceSettings, ModelSettings

GRADIENT_METRICS = ("grad_norm", "fisher", "hessian_trace")


def head_share(table: pd.DataFrame, metric: str) -> float:
    """The head's share of a metric's total over every tensor (grad_norm: of its square)."""
    values = table[metric] ** 2 if metric == "grad_norm" else table[metric]
    return float(values[table["is_head"]].sum() / values.sum())


def main() -> None:
    root = Path(__file__).parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=root / "config" / "config.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--plans", default=root / "config" / "compare.yaml")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = schema.check_schema(yaml.safe_load(Path(args.config).read_text()))
    data = DataSettings.from_config(config["data"])
    model = ModelSettings.from_config(config["model"])
    splits, info = prepare(data, model)
    modality = modalities.for_data(info)
    few = sample_few_shot(splits["train"], args.shots, data.seed)
    device = select_device("auto")

    tables, rows = {}, []
    for head in ("random", "probe"):
        importance = ImportanceSettings.from_config({**config["importance"], "head": head})
        batches = [
            {k: v.to(device) for k, v in batch.items()}
            for batch in calibration_batches(
                modality, few, importance.batches, importance.batch_size, importance.seed
            )
        ]
        task = modality.load_pretrained(model, importance.seed)
        task.model.to(device)
        probe = None
        if head == "probe":
            probe = probe_head(task, few, importance, device)
        start = time.perf_counter()
        table, _ = score_model(
            task,
            batches,
            importance.metrics,
            **importance.scoring_options(),
        )
        scoring = time.perf_counter() - start
        tables[head] = table
        if head == "random" and "hessian_trace" in importance.metrics:
            # The Hutchinson estimate's own noise: the same head, other Rademacher probes.
            redrawn, _ = score_model(
                task,
                batches,
                ["hessian_trace"],
                probes=importance.hutchinson_probes,
                hessian_examples=importance.hessian_examples,
                chunk_size=importance.chunk_size,
                seed=importance.seed + 1,
            )
        shares = {m: head_share(table, m) for m in GRADIENT_METRICS if m in table.columns}
        rows.append((head, importance, probe, scoring, shares))

    head_params = int(tables["random"].loc[tables["random"]["is_head"], "numel"].sum())
    print(
        f"\nmodel {model.name}, {args.shots} shots x {info.num_labels} classes "
        f"({len(few)} examples) on {device}, {args.threads} threads; the head holds "
        f"{head_params:,} of {int(tables['random']['numel'].sum()):,} parameters\n"
    )
    metrics = [m for m in GRADIENT_METRICS if m in tables["random"].columns]
    print(
        "| head | probe s | scoring s | train loss | train acc | "
        + " | ".join(f"head share {m}" for m in metrics)
        + " |"
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * len(metrics))
    for head, importance, probe, scoring, shares in rows:
        fitted = (
            f"{probe.probe_seconds:.2f} | {scoring:.2f} | {probe.train_loss:.3f} | "
            f"{probe.train_accuracy:.3f}"
            if probe
            else f"- | {scoring:.2f} | - | -"
        )
        label = (
            f"probe ({importance.probe_epochs} epochs, lr {importance.probe_lr:g})"
            if probe
            else head
        )
        print(f"| {label} | {fitted} | " + " | ".join(f"{shares[m]:.4f}" for m in metrics) + " |")

    print("\nPer element, the head's layer against the body's top layer (the heatmap's scale):\n")
    print("| head | " + " | ".join(metrics) + " |")
    print("|---|" + "---:|" * len(metrics))
    for head, table in tables.items():
        layers = layer_table(table).set_index("layer_kind", append=True)
        cells = []
        for metric in metrics:
            column = layers[f"{metric}_per_element"]
            on_head = column.xs("head", level="layer_kind").iloc[0]
            top_body = column.drop("head", level="layer_kind").max()
            cells.append(f"{on_head / top_body:.3g}")
        print(f"| {head} | " + " | ".join(cells) + " |")

    body = ~tables["random"]["is_head"]
    print("\nSpearman correlation over the body's tensors, random head against probed head:\n")
    print("| metric | raw score | per element |")
    print("|---|---:|---:|")
    pairs = [(m, tables["random"], tables["probe"]) for m in [*metrics, "combined"]]
    if "hessian_trace" in metrics:
        pairs.append(("hessian_trace, random head, other probes", tables["random"], redrawn))
    for metric, first, second in pairs:
        column = metric.partition(",")[0]
        if column not in first.columns:
            continue
        cells = [
            first.loc[body, c].corr(second.loc[body, c], method="spearman")
            for c in (column, f"{column}_per_element")
        ]
        print(f"| {metric} | {cells[0]:.4f} | {cells[1]:.4f} |")

    plans = yaml.safe_load(Path(args.plans).read_text()).get("strategies", {})
    chosen = {n: s for n, s in plans.items() if s.get("kind") == "importance"}
    if not chosen:
        return
    print(f"\nPlans of the importance strategies of {args.plans}, from each head's scores:\n")
    print(
        "| strategy | trainable random | trainable probe | tensors frozen differently | "
        "largest lr multiplier change |"
    )
    print("|---|---:|---:|---:|---:|")
    made = {
        head: ScoreTables(table, layer_table(table, config["importance"].get("combine")))
        for head, table in tables.items()
    }
    for name, spec in chosen.items():
        spec = {k: v for k, v in spec.items() if k != "head"}
        random_plan = strategies.build_plan(made["random"], name, spec)
        probe_plan = strategies.build_plan(made["probe"], name, spec)
        pairs = list(zip(random_plan.tensors, probe_plan.tensors, strict=True))
        frozen = sum(a.frozen != b.frozen for a, b in pairs)
        moved = max(abs(a.lr_multiplier - b.lr_multiplier) for a, b in pairs)
        print(
            f"| {name} | {random_plan.totals['trainable_fraction']:.1%} | "
            f"{probe_plan.totals['trainable_fraction']:.1%} | {frozen} of {len(pairs)} | "
            f"{moved:.3f} |"
        )


if __name__ == "__main__":
    main()
