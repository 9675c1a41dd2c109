"""Step time of data-parallel fine-tuning (``train.devices``) against one process, on this
machine's CPU: the same full fine-tuning of the bundled MiniLM, the same global batch, once in
one process with ``--threads`` threads and once in 2 Gloo processes started by adaptune's
torchrun launcher with ``--threads / 2`` threads each.

    python benchmarks/ddp_speed.py [--threads 2] [--shots 16] [--epochs 2] [--repeat 2]

Prints a markdown table: seconds per optimizer step over the training epochs (validation
excluded; the median of ``--repeat`` interleaved runs) and examples per second, with a third
setup, one process with half the threads, to tell DDP's own cost (an all-reduce of every
trainable tensor per step over Gloo) from the machine's: on a CPU both setups share the same
cores, so DDP is no speed-up there. The start of torchrun and its workers is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptune import distributed, modalities, training
from adaptune.data import prepare, sample_few_shot
from adaptune.plans import Plan
from adaptune.settings import DataSettings, ModelSettings, TrainSettings

MODEL = "bundled:all-MiniLM-L6-v2"


def train_run(job: dict[str, Any]) -> None:
    """One run (in this process, or as a torchrun worker); rank 0 writes its timing to
    ``job["out"]``."""
    world = distributed.current()
    torch.set_num_threads(max(1, job["threads"] // world.size))
    data = DataSettings.from_config({"source": "bundled:bbc-news", "max_length": job["max_length"]})
    model = ModelSettings.from_config(MODEL)
    splits, info = prepare(data, model)
    train = sample_few_shot(splits["train"], job["shots"], 0)
    val = sample_few_shot(splits["val"], 2, 0)
    task = modalities.for_data(info).load_pretrained(model, 0)
    plan = Plan.train_everything(task.model)
    settings = TrainSettings.from_config(
        {"epochs": job["epochs"], "batch_size": job["batch_size"], "device": "cpu"}
    )
    result = training.train(task, plan, train, val, settings, 0, torch.device("cpu"))
    if world.is_main:
        steps = -(-len(train) // settings.batch_size) * settings.epochs
        Path(job["out"]).write_text(
            json.dumps(
                {
                    "seconds_per_step": result.train_seconds / steps,
                    "examples_per_second": len(train) * settings.epochs / result.train_seconds,
                    "examples": len(train),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2, help="median of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The workers import this file as a module.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [here, str(Path(distributed.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    )
    sys.path.insert(0, here)
    half = max(1, args.threads // 2)
    times: dict[str, list[dict[str, float]]] = {
        f"1 process, {args.threads} threads": [],
        f"1 process, {half} thread(s)": [],
        f"2 Gloo processes, {half} thread(s) each": [],
    }
    single_name, half_name, ddp_name = times
    launch_seconds = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "timing.json"
        job = {
            "threads": args.threads,
            "shots": args.shots,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "out": str(out),
        }
        for _ in range(args.repeat):
            train_run(job)
            times[single_name].append(json.loads(out.read_text()))
            train_run({**job, "threads": half})
            times[half_name].append(json.loads(out.read_text()))
            start = time.perf_counter()
            distributed.launch(2, "ddp_speed:train_run", job)
            launch_seconds.append(time.perf_counter() - start)
            times[ddp_name].append(json.loads(out.read_text()))
            torch.set_num_threads(args.threads)
    examples = times[single_name][0]["examples"]
    print(
        f"\n{MODEL}, full fine-tuning, {examples} BBC News articles, global batch "
        f"{args.batch_size}, up to {args.max_length} tokens, {args.epochs} epochs, CPU, "
        f"{args.threads} threads in all, median of {args.repeat} interleaved runs\n"
    )
    print(f"| setup | s per step | examples/s | x {single_name} |")
    print("|---|---:|---:|---:|")
    single = float(np.median([t["seconds_per_step"] for t in times[single_name]]))
    for name, runs in times.items():
        step = float(np.median([t["seconds_per_step"] for t in runs]))
        speed = float(np.median([t["examples_per_second"] for t in runs]))
        print(f"| {name} | {step:.3f} | {speed:.1f} | {single / step:.2f} |")
    print(
        f"\n2 processes: the whole launch (torchrun, imports, data, model, training) took "
        f"{np.median(launch_seconds):.1f} s (median)"
    )


if __name__ == "__main__":
    main()
