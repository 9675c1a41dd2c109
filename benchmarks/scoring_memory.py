"""Peak memory and seconds of importance scoring against model size, next to one step and one
epoch of full fine-tuning at the same batch size: randomly initialised BERTs of four sizes
(MiniLM-L6's shape, bert-medium's, bert-base's, bert-large's) with the bundled MiniLM tokenizer,
on 16 BBC News articles per class (80 examples) at 128 tokens.

    python benchmarks/scoring_memory.py [--sizes mini medium base large] [--threads 2]
        [--per-metric] [--live] [--light] [--jobs step epoch score:auto:all ...]

Scoring is what the ``score_importance`` stage computes once the model is loaded:
:func:`adaptune.importance.score_model` with the schema's ``importance`` defaults (every metric,
2 calibration batches of 16, ``chunk_size`` 4, 4 Hutchinson probes on 8 examples, the random
head), per-example gradients by the loop (``auto`` on the CPU) and by ``vmap``, then
:func:`adaptune.memory.profile_activations` on the first batch; ``--per-metric`` adds grad_norm,
fisher (both paths) and hessian_trace alone. ``--light`` scores on one calibration batch of 16,
with two Hutchinson probes (the
schema's least) on 4 examples: the same peak (each estimator's peak is one batch's,
one example's or one chunk's, whatever their number), a fraction of the seconds, for models
whose scoring at the defaults would take hours on a CPU. A fine-tuning step is AdamW (fp32,
the model in train mode) on one batch of 16: forward, backward, step; the epoch is adaptune's
own training loop (:func:`adaptune.training.train`, 5 steps, its validation pass on 8 examples
excluded from the seconds).

Each measurement runs in a fresh process (this one imports neither torch nor the model). Peak is
the process's resident peak (``ru_maxrss``, whole process); growth is the resident peak of the
measured call above the process's resident size once the model and batches were loaded (the
kernel's high-water mark, reset after loading). With ``--live``, tensors is the most bytes of
tensors alive at once during the call, weights included (tests/live_tensors.py: exact, but it slows
small operations several times); on a GPU, GPU peak is ``torch.cuda.max_memory_allocated``
over the call, weights included. The ratios are over the same model's fine-tuning step: of the
GPU peak where there is one, else of the tensors where counted, else of the resident peak; and
of the growth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # BertConfig shapes: hidden size, blocks, attention heads, feed-forward width
    "mini": (384, 6, 12, 1536),
    "medium": (512, 8, 8, 2048),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}
SHOTS, MAX_LENGTH, SEED = 16, 128, 0
SCORING = ["score:auto:all", "score:vmap:all"]
PER_METRIC = [
    "score:auto:grad_norm",
    "score:loop:fisher",
    "score:vmap:fisher",
    "score:auto:hessian_trace",
]


def save_model(directory: Path, size: str) -> None:
    """A randomly initialised BERT of ``size`` with the bundled MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptune.modalities.text.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("bundled:all-MiniLM-L6-v2"))
    hidden, blocks, heads, width = SIZES[size]
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        intermediate_size=width,
        max_position_embeddings=512,
    )
    torch.manual_seed(SEED)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_data(directory: Path, model: Path) -> None:
    """BBC News tokenised at 128 tokens, 16 training examples per class, and data.json."""
    from adaptune.data import prepare, sample_few_shot, save_split
    from adaptune.settings import DataSettings, ModelSettings

    data = DataSettings.from_config({"source": "bundled:bbc-news", "max_length": MAX_LENGTH})
    splits, info = prepare(data, ModelSettings.from_config(f"path:{model}"))
    save_split(sample_few_shot(splits["train"], SHOTS, data.seed), directory / "train.parquet")
    info.write(directory / "data.json")


def resident_mb() -> tuple[float, float]:
    """The process's resident size now and its high-water mark since the last reset, in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_resident_peak() -> None:
    """Linux: writing 5 to clear_refs resets the high-water mark to the resident size now."""
    Path("/proc/self/clear_refs").write_text("5")


def fine_tuning_step(task, batch) -> None:
    import torch

    model = task.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    loss = torch.nn.functional.cross_entropy(task.logits(batch), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fine_tuning_epoch(task, train, device) -> float:
    from adaptune import strategies
    from adaptune.importance import tensor_table
    from adaptune.plans import ScoreTables
    from adaptune.settings import TrainSettings
    from adaptune.training import train as train_loop

    skeleton = tensor_table(task)
    plan = strategies.build_plan(ScoreTables(skeleton, skeleton.iloc[:0]), "full", {"kind": "full"})
    settings = TrainSettings.from_config({"epochs": 1, "batch_size": 16})
    result = train_loop(task, plan, train, train.head(8), settings, SEED, device)
    return result.train_seconds


def scoring(task, batches, settings, path: str, metrics: str) -> None:
    """What the score_importance stage computes once the model is loaded: the metrics, then the
    activation profile of the plans' memory estimates."""
    from adaptune.importance import score_model
    from adaptune.memory import profile_activations

    options = {**settings.scoring_options(), "per_example": path}
    score_model(task, batches, settings.metrics if metrics == "all" else [metrics], **options)
    profile_activations(task, batches[0])


LIGHT = {"batches": 1, "hutchinson_probes": 2, "hessian_examples": 4}  # the schema's least probes


def measure(job: str, model: Path, data: Path, threads: int, live: bool, light: bool) -> dict:
    """One measurement, in this process."""
    import gc
    import resource
    import time

    import torch

    from adaptune import modalities
    from adaptune.data import read_split
    from adaptune.data_info import DataInfo
    from adaptune.importance import calibration_batches
    from adaptune.settings import ImportanceSettings, ModelSettings

    torch.set_num_threads(threads)
    modality = modalities.for_data(DataInfo.read(data / "data.json"))
    train = read_split(data / "train.parquet")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = modality.load_pretrained(ModelSettings.from_config(f"path:{model}"), SEED)
    task.model.to(device)
    if device.type == "cpu":  # weights in the process's memory, not pages of a file read lazily
        for tensor in [*task.model.parameters(), *task.model.buffers()]:
            tensor.data = tensor.data.clone()
        gc.collect()
    settings = ImportanceSettings.from_config(LIGHT if light else {})
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in calibration_batches(modality, train, settings.batches, settings.batch_size, SEED)
    ]
    params = sum(p.numel() for p in task.model.parameters())
    counter: contextlib.AbstractContextManager = contextlib.nullcontext()
    if live:
        sys.path.insert(0, str(REPO))
        from tests.live_tensors import LiveTensorBytes

        counter = LiveTensorBytes([*task.model.parameters(), *task.model.buffers()])
    loaded_mb, _ = resident_mb()
    load_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset_resident_peak()  # ru_maxrss too: the process's peak is the larger of the two phases
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with counter:
        if job == "step":
            fine_tuning_step(task, batches[0])
        elif job == "epoch":
            train_seconds = fine_tuning_epoch(task, train, device)
        else:
            _, path, metrics = job.split(":")
            scoring(task, batches, settings, path, metrics)
    seconds = time.perf_counter() - start
    _, phase_peak_mb = resident_mb()
    result = {
        "job": f"{job}:light" if light and job.startswith("score") else job,
        "params": params,
        "seconds": train_seconds if job == "epoch" else seconds,
        "peak_mb": max(load_peak_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loaded_mb": loaded_mb,
        "growth_mb": phase_peak_mb - loaded_mb,
    }
    if live:
        result["tensors_mb"] = counter.peak / 2**20
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def child(*args: str) -> str:
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def measured(job: str, model: Path, data: Path, flags: list[str]) -> dict:
    """A measurement in a fresh process; one that fails (out of memory) is reported as such
    rather than ending the run."""
    try:
        return json.loads(child("--one", job, str(model), str(data), *flags))
    except RuntimeError as err:
        return {"job": job, "failed": str(err).strip().splitlines()[-1][:120]}


NAMES = {"step": "fine-tuning step", "epoch": "fine-tuning epoch"}


def scoring_name(job: str) -> str:
    """``score:PATH:METRICS[:light]`` in a table's words: ``all (auto)``, ``all (auto, light)``."""
    _, path, metrics, *light = job.split(":")
    return f"{metrics} ({', '.join([path, *light])})"


def print_table(results: dict[str, dict[str, dict]]) -> None:
    """One row per model and measurement; the ratios are over the same model's fine-tuning
    step: of the peak (of CUDA's allocations on a GPU, else of the tensors where counted, else
    resident) and of the growth."""
    first = next(
        (r for by_job in results.values() for r in by_job.values() if "failed" not in r), {}
    )
    columns = {"peak_mb": "peak MB", "growth_mb": "growth MB", "tensors_mb": "tensors MB"}
    columns["cuda_peak_mb"] = "GPU peak MB"
    memory = [key for key in columns if key in first]
    header = ["model", "params", "measurement", *(columns[key] for key in memory)]
    header += ["seconds", "x step peak", "x step growth"]
    print("\n| " + " | ".join(header) + " |")
    print("|---|---:|---|" + "---:|" * (len(header) - 3))
    for size, by_job in results.items():
        step = by_job.get("step", {})
        peak = next((k for k in ("cuda_peak_mb", "tensors_mb", "peak_mb") if k in step), None)
        for job, r in by_job.items():
            if "failed" in r or peak is None:
                why = r.get("failed", "no fine-tuning step to compare with")
                print(f"| {size} | | {job} | failed: {why} |")
                continue
            cells = [
                size,
                f"{r['params'] / 1e6:.1f}M",
                NAMES.get(job) or scoring_name(r["job"]),
                *(f"{r[key]:,.0f}" for key in memory),
                f"{r['seconds']:.1f}",
                f"{r[peak] / step[peak]:.2f}",
                f"{r['growth_mb'] / step['growth_mb']:.2f}",
            ]
            print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-metric", action="store_true")
    parser.add_argument("--live", action="store_true", help="count the bytes of live tensors")
    parser.add_argument("--light", action="store_true", help="score on fewer examples (see above)")
    parser.add_argument(
        "--jobs", nargs="+", help="only these measurements (step, epoch, score:PATH:METRIC)"
    )
    parser.add_argument("--one", nargs=3, metavar=("JOB", "MODEL", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--save", nargs=2, metavar=("WHAT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        job, model, data = args.one
        print(
            json.dumps(measure(job, Path(model), Path(data), args.threads, args.live, args.light))
        )
        return
    if args.save:
        what, directory = args.save
        if what == "data":
            save_data(Path(directory), Path(directory).parent / args.sizes[0])
        else:
            save_model(Path(directory), what)
        return
    jobs = args.jobs or ["step", "epoch", *SCORING, *(PER_METRIC if args.per_metric else [])]
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for size in args.sizes:
            child("--save", size, str(root / size))
        (root / "data").mkdir()
        child("--sizes", args.sizes[0], "--save", "data", str(root / "data"))
        for size in args.sizes:
            results[size] = {}
            for job in jobs:
                flags = ["--threads", str(args.threads)]
                flags += [f"--{flag}" for flag in ("live", "light") if getattr(args, flag)]
                results[size][job] = measured(job, root / size, root / "data", flags)
                print(json.dumps({"size": size, **results[size][job]}), flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
