"""Training throughput of adaptune's fine-tuning loop against a plain PyTorch loop and Hugging
Face's ``Trainer``, in one process, on the same model, data and optimizer settings: full
fine-tuning and training the head alone (where adaptune computes the frozen body once).

    python benchmarks/finetune_speed.py [--epochs 3] [--threads 2] [--shots 16]
    python benchmarks/finetune_speed.py --loops adaptune --modes full --threads 1   # one loop
    python benchmarks/finetune_speed.py --gpu-model-size base   # on a GPU: bert-base in bf16

Prints a markdown table: examples per second over the training epochs (validation excluded for
all three; adaptune's time includes building its frozen-prefix cache), the median of
``--repeat`` interleaved runs, and each against the plain loop. With ``--gpu-model-size`` and
a CUDA device, a second table gives a randomly initialised BERT of that size in bf16: tokens
per second and the model-FLOPs utilisation, 6 x parameters x tokens / time / the device's peak
bf16 FLOP rate.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptune import modalities, strategies, training
from adaptune.data import prepare, sample_few_shot
from adaptune.data_info import DataInfo
from adaptune.importance import layer_table, score_model
from adaptune.modalities import TaskModel
from adaptune.plans import ScoreTables
from adaptune.settings import DataSettings, ModelSettings, TrainSettings

# Peak dense bf16 FLOP/s by device name (vendor figures), for the utilisation column.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def load(model: ModelSettings, info: DataInfo, seed: int = 0) -> TaskModel:
    return modalities.for_data(info).load_pretrained(model, seed)


def trains(task: TaskModel, mode: str) -> Callable[[str], bool]:
    return (lambda name: name in task.head) if mode == "head_only" else (lambda name: True)


def plain_loop(task: TaskModel, train, settings: TrainSettings, mode: str, device) -> float:
    """The textbook loop: DataCollatorWithPadding batches, AdamW, linear warm-up and decay,
    gradient clipping; returns examples per second."""
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    model = task.model.to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(trains(task, mode)(name))
    rows = [
        {"input_ids": ids.tolist(), "labels": int(y)}
        for ids, y in zip(train["input_ids"], train["label_id"], strict=True)
    ]
    collator = DataCollatorWithPadding(tokenizer=_tokenizer())
    generator = torch.Generator().manual_seed(0)
    batches = DataLoader(
        rows, batch_size=settings.batch_size, shuffle=True, generator=generator, collate_fn=collator
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = len(batches) * settings.epochs
    schedule = get_linear_schedule_with_warmup(optimizer, round(0.1 * steps), steps)
    model.train()
    start = time.perf_counter()
    for _ in range(settings.epochs):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            schedule.step()
    return len(rows) * settings.epochs / (time.perf_counter() - start)


def hf_trainer(task: TaskModel, train, settings: TrainSettings, mode: str, device) -> float:
    """Hugging Face's Trainer with the same settings; returns examples per second."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model = task.model
    for name, param in model.named_parameters():
        param.requires_grad_(trains(task, mode)(name))
    rows = [
        {"input_ids": ids.tolist(), "labels": int(y)}
        for ids, y in zip(train["input_ids"], train["label_id"], strict=True)
    ]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        arguments = TrainingArguments(
            output_dir=folder,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=settings.epochs,
            learning_rate=settings.lr,
            weight_decay=settings.weight_decay,
            warmup_steps=round(
                settings.warmup_ratio * -(-len(rows) // settings.batch_size) * settings.epochs
            ),
            max_grad_norm=settings.max_grad_norm,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=rows,
            data_collator=DataCollatorWithPadding(tokenizer=_tokenizer()),
        )
        start = time.perf_counter()
        trainer.train()
        return len(rows) * settings.epochs / (time.perf_counter() - start)


def adaptune_loop(task: TaskModel, train, val, info, settings, mode: str, device) -> float:
    """adaptune's finetune (its plan, groups, schedule; the frozen prefix cached for
    head_only); returns examples per second over the training epochs."""
    scores, _ = score_model(task, [], ["weight_l2"])
    tables = ScoreTables(scores, layer_table(scores))
    plan = strategies.build_plan(tables, mode, {"kind": mode})
    result = training.train(task, plan, train, val, settings, 0, device)
    return len(train) * settings.epochs / result.train_seconds


_TOKENIZER = {}


def _tokenizer():
    return _TOKENIZER["tokenizer"]


def gpu_table(size: str, device: torch.device) -> None:
    """A randomly initialised BERT (``base``: 12 x 768) in bf16: tokens/s and utilisation."""
    from transformers import BertConfig, BertForSequenceClassification

    config = (
        BertConfig()
        if size == "base"
        else BertConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        )
    )
    model = BertForSequenceClassification(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, length, steps = 32, 256, 30
    ids = torch.randint(1000, 20000, (batch, length), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    for step in range(steps + 5):
        if step == 5:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = batch * length * steps
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = 6 * params * tokens / seconds
    print(
        f"\n{name}: BERT-{size} ({params / 1e6:.0f}M parameters), bf16, "
        f"batch {batch} x {length} tokens\n"
    )
    print("| tokens/s | model TFLOP/s | MFU |")
    print("|---:|---:|---:|")
    mfu = f"{flops / peak:.1%}" if peak else "–"
    print(f"| {tokens / seconds:,.0f} | {flops / 1e12:.1f} | {mfu} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    parser.add_argument("--gpu-model-size", choices=["base", "large"])
    parser.add_argument(
        "--loops",
        nargs="+",
        choices=["plain", "trainer", "adaptune"],
        default=["plain", "trainer", "adaptune"],
        help="which loops to time (the ratio column needs plain)",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["full", "head_only"], default=["full", "head_only"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = DataSettings.from_config({"source": "bundled:bbc-news", "max_length": args.max_length})
    model = ModelSettings.from_config("bundled:all-MiniLM-L6-v2")
    splits, info = prepare(data, model)
    train = sample_few_shot(splits["train"], args.shots, 0)
    val = sample_few_shot(splits["val"], args.shots, 0)
    from adaptune.modalities.text.models import load_tokenizer

    _TOKENIZER["tokenizer"] = load_tokenizer(model.name)
    every_loop = {
        "plain": (
            "plain PyTorch loop",
            lambda s, m: plain_loop(load(model, info), train, s, m, device),
        ),
        "trainer": (
            "Hugging Face Trainer",
            lambda s, m: hf_trainer(load(model, info), train, s, m, device),
        ),
        "adaptune": (
            "adaptune finetune",
            lambda s, m: adaptune_loop(load(model, info), train, val, info, s, m, device),
        ),
    }
    loops = dict(every_loop[key] for key in args.loops)
    rows = []
    for mode in args.modes:
        lr = 1e-2 if mode == "head_only" else 5e-5
        settings = TrainSettings.from_config({"epochs": args.epochs, "lr": lr})
        # Interleaved repeats, so that a slow spell of the machine hits every loop alike.
        runs = {name: [] for name in loops}
        for _ in range(args.repeat):
            for name, run in loops.items():
                runs[name].append(run(settings, mode))
        speeds = {name: float(np.median(values)) for name, values in runs.items()}
        plain = speeds.get("plain PyTorch loop", float("nan"))
        rows += [(mode, name, value, value / plain) for name, value in speeds.items()]
    print(
        f"\n{model.name} on {len(train)} BBC News articles ({args.shots} per class, up to "
        f"{args.max_length} tokens), batch 16, {args.epochs} epochs, {device}, "
        f"{args.threads} threads, median of {args.repeat} runs\n"
    )
    print("| mode | loop | examples/s | x plain loop |")
    print("|---|---|---:|---:|")
    for mode, name, value, ratio in rows:
        print(f"| {mode} | {name} | {value:.1f} | {'–' if np.isnan(ratio) else f'{ratio:.2f}'} |")
    if args.gpu_model_size and device.type == "cuda":
        gpu_table(args.gpu_model_size, device)


if __name__ == "__main__":
    main()
