"""What a kill costs a fine-tuning run that checkpoints, on this machine's CPU: full fine-tuning of
the bundled MiniLM on 16 BBC News articles per class (80 examples, 5 steps an epoch), with a
checkpoint at each epoch's end (or every ``--every-steps`` optimizer steps).

    python benchmarks/resume.py [--epochs 6] [--kills 3] [--every-steps 0] [--threads 2]

Each run is a child process (imports, data, model, training: what a rerun of a job repeats).
First one run without a stop; then, ``--kills`` times, a run killed with SIGKILL at a random
moment after its first checkpoint and run again to its end. Prints a markdown table: when each
kill came, the work it lost (the kill's time minus the last checkpoint's), the restarted run's
start-up (process start to its first training step: imports, data, model, the checkpoint's
load), the time the kill cost (both attempts' wall time minus the uninterrupted run's), the
bound the issue sets (one checkpoint interval plus the start-up), and whether the resumed
run's weights are bit-identical to the uninterrupted run's; then the checkpoint's size and
write time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "bundled:all-MiniLM-L6-v2"


def child(folder: Path, epochs: int, every_steps: int, threads: int) -> None:
    """One attempt of the run, checkpointing into ``folder``; writes its timings and, at the
    end, its weights' digest to ``folder/../attempt-<pid>.json``."""
    began = time.time()
    import torch

    from adaptune import modalities, training
    from adaptune.checkpoints import Checkpoints
    from adaptune.data import prepare, sample_few_shot
    from adaptune.plans import Plan
    from adaptune.settings import DataSettings, ModelSettings, TrainSettings

    torch.set_num_threads(threads)
    folder.parent.mkdir(parents=True, exist_ok=True)  # written before the first checkpoint
    report = folder.parent / f"attempt-{os.getpid()}.json"
    record = {"began": began}

    def write() -> None:
        report.write_text(json.dumps(record))

    data = DataSettings.from_config({"source": "bundled:bbc-news", "max_length": 128})
    model = ModelSettings.from_config(MODEL)
    splits, info = prepare(data, model)
    train, val = sample_few_shot(splits["train"], 16, 0), sample_few_shot(splits["val"], 4, 0)
    task = modalities.for_data(info).load_pretrained(model, 0)
    plan = Plan.train_everything(task.model)
    settings = TrainSettings.from_config(
        {
            "epochs": epochs,
            "batch_size": 16,
            "device": "cpu",
            "checkpoint": {"every_steps": every_steps},
        }
    )
    saved = Checkpoints(folder, {"benchmark": "resume"}, every_steps)
    step = training.TrainingLoop.step

    def timed_step(loop, *args, **kwargs):
        record.setdefault("first_step", time.time())
        write()
        return step(loop, *args, **kwargs)

    save = saved.save

    def timed_save(state):
        seconds = save(state)
        record.setdefault("checkpoints", []).append(
            [time.time(), seconds, saved.path.stat().st_size]
        )
        write()
        return seconds

    training.TrainingLoop.step = timed_step
    saved.save = timed_save
    result = training.train(
        task,
        plan,
        train,
        val,
        settings,
        0,
        torch.device("cpu"),
        checkpoints=saved,
        resume=saved.load(),
    )
    weights = b"".join(p.detach().numpy().tobytes() for p in task.model.parameters())
    record.update(
        ended=time.time(),
        digest=hashlib.sha256(weights).hexdigest(),
        epoch_seconds=float(result.history["epoch_seconds"].mean()),
    )
    write()


def attempt(folder: Path, args: argparse.Namespace, kill_after: float | None) -> dict:
    """Run one attempt; with ``kill_after``, SIGKILL it that many seconds after its first
    checkpoint. Returns its record (with ``wall``, and ``killed`` at the kill's time)."""
    command = [sys.executable, __file__, "--child", str(folder), "--epochs", str(args.epochs)]
    command += ["--every-steps", str(args.every_steps), "--threads", str(args.threads)]
    start = time.time()
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed = None
    if kill_after is not None:
        state = folder / "state.pt"
        while not state.exists():
            if process.poll() is not None:
                raise RuntimeError("the run ended before its first checkpoint")
            time.sleep(0.05)
        time.sleep(kill_after)
        killed = time.time()
        process.send_signal(signal.SIGKILL)
    process.wait()
    wall = time.time() - start
    reports = sorted(folder.parent.glob("attempt-*.json"), key=lambda p: p.stat().st_mtime)
    record = json.loads(reports[-1].read_text())
    reports[-1].unlink()
    return {**record, "wall": wall, "killed": killed, "start": start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--every-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.epochs, args.every_steps, args.threads)
        return
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="adaptune-resume-") as tmp:
        whole = attempt(Path(tmp) / "whole" / "checkpoint", args, None)
        saves = whole["checkpoints"]
        interval = (saves[-1][0] - saves[0][0]) / (len(saves) - 1)
        # the run's span from its first checkpoint to its end, where a kill can land
        span = whole["ended"] - saves[0][0]
        rows = []
        for kill in range(args.kills):
            folder = Path(tmp) / f"kill{kill}" / "checkpoint"
            after = rng.uniform(0, span * 0.9)
            first = attempt(folder, args, after)
            last_save = max(c[0] for c in first["checkpoints"] if c[0] <= first["killed"])
            second = attempt(folder, args, None)
            startup = second["first_step"] - second["start"]
            cost = first["wall"] + second["wall"] - whole["wall"]
            rows.append(
                (
                    first["killed"] - first["start"],
                    first["killed"] - last_save,
                    startup,
                    cost,
                    interval + startup,
                    second["digest"] == whole["digest"],
                )
            )
    every = f"every {args.every_steps} steps" if args.every_steps else "at each epoch end"
    print(
        f"Full fine-tuning of {MODEL}, 80 examples, {args.epochs} epochs, a checkpoint {every}, "
        f"{args.threads} threads; uninterrupted: {whole['wall']:.1f} s wall, "
        f"{whole['epoch_seconds']:.1f} s per epoch, {interval:.1f} s between checkpoints\n"
    )
    print(
        "| kill at (s) | work lost (s) | restart's start-up (s) | kill's cost (s) "
        "| bound: interval + start-up (s) | within | bit-identical |"
    )
    print("|---:|---:|---:|---:|---:|---|---|")
    for at, lost, startup, cost, bound, same in rows:
        within = "yes" if cost <= bound else "no"
        print(
            f"| {at:.1f} | {lost:.1f} | {startup:.1f} | {cost:.1f} | {bound:.1f} | {within} "
            f"| {'yes' if same else 'no'} |"
        )
    sizes = [c[2] for c in whole["checkpoints"]]
    writes = [c[1] for c in whole["checkpoints"]]
    print(
        f"\ncheckpoint: {max(sizes) / 1e6:.0f} MB, written in {min(writes):.2f}-"
        f"{max(writes):.2f} s ({len(writes)} in the uninterrupted run)"
    )


if __name__ == "__main__":
    main()
