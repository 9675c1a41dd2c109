"""Memory and time of the data path at scale: ``shots: all`` on N text examples (BBC News articles
repeated, each copy made distinct), prepared and trained one epoch, each N in a fresh process.

    python benchmarks/scale.py [--examples 10000 50000 100000] [--max-length 128] [--threads 2]

The model is a small randomly initialised BERT with MiniLM's tokenizer (memory, not accuracy,
is measured). Prints a markdown table: per N, the seconds and peak resident memory of prepare
and of one full fine-tuning epoch, and the size of the token arrays, so that growth with N can
be read against what the examples themselves need.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import save_tiny_bert


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_csv(path: Path, count: int) -> None:

    from adaptune.modalities.text.sources import load_bbc_news

    bbc = load_bbc_news()
    copies = bbc.sample(n=count, replace=True, random_state=0).reset_index(drop=True)
    copies["text"] = copies["text"] + " [copy " + copies.index.astype(str) + "]"
    copies.to_csv(path, index=False)


def measure(csv: Path, model: Path, max_length: int, threads: int) -> dict:
    """In this process: prepare, then one epoch of full fine-tuning on every training example."""
    import torch

    from adaptune import modalities, strategies, training
    from adaptune.data import prepare
    from adaptune.importance import layer_table, score_model
    from adaptune.plans import ScoreTables
    from adaptune.settings import DataSettings, ModelSettings, TrainSettings

    torch.set_num_threads(threads)
    start_mb = peak_mb()
    data = DataSettings.from_config(
        {"source": f"csv:{csv}", "max_length": max_length, "val_size": 0.01, "test_size": 0.01}
    )
    model = ModelSettings.from_config(f"path:{model}")
    start = time.perf_counter()
    splits, info = prepare(data, model)
    prepare_seconds, prepare_mb = time.perf_counter() - start, peak_mb()
    train, val = splits["train"], splits["val"]
    token_mb = sum(len(ids) for ids in train["input_ids"]) * 4 / 1e6
    del splits
    task = modalities.for_data(info).load_pretrained(model, 0)
    scores, _ = score_model(task, [], ["weight_l2"])
    plan = strategies.build_plan(ScoreTables(scores, layer_table(scores)), "full", {"kind": "full"})
    settings = TrainSettings.from_config({"epochs": 1, "batch_size": 32, "eval_batch_size": 256})
    result = training.train(task, plan, train, val, settings, 0, torch.device("cpu"))
    return {
        "examples": info.num_examples,
        "train": len(train),
        "prepare_s": prepare_seconds,
        "prepare_mb": prepare_mb - start_mb,
        "epoch_s": result.train_seconds,
        "peak_mb": peak_mb() - start_mb,
        "token_mb": token_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("CSV", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(measure(Path(args.one[0]), Path(args.one[1]), args.max_length, args.threads))
        )
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "model"
        save_tiny_bert(model, hidden_size=64, max_positions=512)
        for count in args.examples:
            csv = Path(folder) / f"news-{count}.csv"
            make_csv(csv, count)
            command = [sys.executable, __file__, "--one", str(csv), str(model)]
            command += ["--max-length", str(args.max_length), "--threads", str(args.threads)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    print(
        f"\nshots: all, a 2-block BERT (hidden 64) with MiniLM's tokenizer, up to "
        f"{args.max_length} tokens, {args.threads} threads; memory above the process's start\n"
    )
    print("| examples | train | prepare s | prepare MB | epoch s | peak MB | token arrays MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['examples']:,} | {r['train']:,} | {r['prepare_s']:.0f} | "
            f"{r['prepare_mb']:,.0f} | {r['epoch_s']:.0f} | {r['peak_mb']:,.0f} | "
            f"{r['token_mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
