"""Resuming killed fine-tuning jobs (adaptune.checkpoints): a run resumed from its checkpoint,
at an epoch's end or within one, ends bit-identical to one never stopped; a checkpoint made
under other settings or code is set aside, not resumed; rows a kill left unlogged reach MLflow
once; and, through the whole workflow, a `finetune` job killed with kill -9 or stopped with
SIGTERM continues in its own MLflow run when rerun."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from adaptune import checkpoints, tracking, training
from adaptune.checkpoints import Checkpoints
from adaptune.settings import TrainSettings

from .conftest import Workflow, read_table, tiny_config, tiny_task
from .test_training import frame
from .test_training_levers import plan_of


class Killed(Exception):
    """Where a test stops a run as a kill would (nothing after it runs)."""


def thawing(model, kind: str = "full"):
    """The embeddings frozen, block 1 thawing in epoch 2 (gradual unfreezing's state: which
    tensors train, and the optimizer state of only those that have), in a plan of ``kind``."""
    plan = plan_of(
        model,
        frozen=lambda n: n.startswith("bert.embeddings"),
        thaw=lambda n: 2 if n.startswith("bert.encoder.layer.1.") else 1,
    )
    return dataclasses.replace(plan, kind=kind)


def run(
    tiny_bert_dir,
    folder: Path | None = None,
    every_steps: int = 0,
    kill_at: int = -1,
    kind: str = "full",
    every_seconds: float = 0.0,
    clock=None,
    **values,
):
    """Three epochs of the tiny BERT (dropout on: the random state matters) on 20 examples in
    batches of 8 (3 steps an epoch), checkpointed into ``folder``; ``kill_at``: the optimizer
    step (of the run) before which it is killed; ``kind``: the plan's strategy kind (its
    hooks); ``values``: more training settings. Returns the weights the last epoch left (not
    the best epoch's, which may be the first) and the history."""
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    values = {"optimizer": "adamw", "lr": 1e-2, "epochs": 3, "batch_size": 8, **values}
    settings = TrainSettings.from_config({**values, "checkpoint": {"every_steps": every_steps}})
    saved = Checkpoints(folder, {"job": "test"}, every_steps, every_seconds) if folder else None
    if saved and clock:
        saved.clock = clock
        saved.last_saved = clock()
    step = training.TrainingLoop.step

    def killable(loop, *args, **kwargs):
        if loop.global_step == kill_at:
            raise Killed
        return step(loop, *args, **kwargs)

    training.TrainingLoop.step = killable
    try:
        result = training.train(
            task,
            thawing(task.model, kind),
            frame(20, 0),
            frame(9, 1),
            settings,
            0,
            torch.device("cpu"),
            restore_best=False,
            checkpoints=saved,
            resume=saved.load() if saved else None,
        )
    finally:
        training.TrainingLoop.step = step
    return {n: p.detach().clone() for n, p in task.model.named_parameters()}, result.history


# Auto-RGN: hooks that change every tensor's rate at each epoch's first step (optimizer and
# schedule state), on bf16 weights with fp32 masters.
RGN_BF16 = {"kind": "auto_rgn", "weight_precision": "bf16", "precision": "bf16"}


@pytest.mark.parametrize(
    ("every_steps", "kill_at", "saved_at", "options"),
    [(0, 4, (1, 0, True), {}), (2, 5, (2, 1, False), {}), (2, 5, (2, 1, False), RGN_BF16)],
    ids=["at an epoch's end", "within an epoch", "auto_rgn on bf16 weights"],
)
def test_a_resumed_run_is_bit_identical_to_one_never_stopped(
    tiny_bert_dir, tmp_path, caplog, every_steps, kill_at, saved_at, options
):
    whole, history = run(tiny_bert_dir, **options)
    folder = tmp_path / "checkpoint"
    with pytest.raises(Killed):
        run(tiny_bert_dir, folder, every_steps, kill_at, **options)
    state = Checkpoints(folder, {}).read()
    assert (state["epoch"], state["steps_done"], state["epoch_done"]) == saved_at
    with caplog.at_level(logging.INFO, logger="adaptune.training"):
        resumed, resumed_history = run(tiny_bert_dir, folder, every_steps, **options)
    assert f"resumed from epoch {saved_at[0]}" in caplog.text
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
    columns = ["epoch", "train_loss", "val_loss", "val_macro_f1", "lr"]
    assert resumed_history[columns].equals(history[columns])

    # The test can fail: without the random state (dropout's masks), the same resume differs.
    restore = training.set_rng_state
    training.set_rng_state = lambda state, device: None
    try:
        with pytest.raises(Killed):
            run(tiny_bert_dir, tmp_path / "again", every_steps, kill_at, **options)
        careless, _ = run(tiny_bert_dir, tmp_path / "again", every_steps, **options)
    finally:
        training.set_rng_state = restore
    assert any(not torch.equal(careless[n], whole[n]) for n in whole)


def test_an_epoch_end_saves_once_its_interval_has_passed(tiny_bert_dir, tmp_path, monkeypatch):
    saves = []

    def save(self, state):  # what save does to the clock, without writing
        saves.append(state["epoch"])
        self.last_saved = self.clock()
        return 0.0

    monkeypatch.setattr(Checkpoints, "save", save)
    run(tiny_bert_dir, tmp_path / "every", every_seconds=0)
    assert saves == [1, 2, 3]  # 0: every epoch
    saves.clear()
    # A clock read when the job starts (0 s), at each epoch's end and after each save: epoch
    # 1 ends at 30 s, epoch 2 at 60 s (saved); the last epoch saves whatever the clock says.
    readings = iter([0.0, 30.0, 60.0, 60.0, 70.0])
    run(tiny_bert_dir, tmp_path / "timed", every_seconds=50, clock=lambda: next(readings))
    assert saves == [2, 3]
    saves.clear()
    run(tiny_bert_dir, tmp_path / "rarely", every_seconds=3600)
    assert saves == [3]
    saves.clear()
    # The step interval falling on an epoch's last step saves at its end (3 steps an epoch).
    run(tiny_bert_dir, tmp_path / "steps", every_steps=3, every_seconds=3600)
    assert saves == [1, 2, 3]


def test_a_checkpoint_of_other_settings_or_code_is_set_aside_not_resumed(tmp_path, caplog):
    folder = tmp_path / "run" / ".checkpoint"
    made = {"settings": "a", "plan": "p", "data": "d", "model": "m", "code": "c1"}
    Checkpoints(folder, made).save(
        {"epoch": 2, "epoch_done": True, "global_step": 6, "weights": torch.ones(3)}
    )
    assert Checkpoints(folder, made).load()["weights"].sum() == 3  # the same job resumes
    now = {**made, "settings": "b", "code": "c2"}
    with caplog.at_level(logging.WARNING, logger="adaptune.checkpoints"):
        assert Checkpoints(folder, now).load() is None
    aside = tmp_path / "run" / ".checkpoint.stale"
    assert not folder.exists() and (aside / "state.pt").is_file()
    why = (aside / "WHY").read_text()
    assert "other code, settings than this job's" in why
    assert "not resumed" in caplog.text and "starts from epoch 1" in caplog.text
    assert str(aside) in caplog.text
    # an unreadable one (a disk that filled up while another job wrote) is set aside too
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"not a torch file")
    assert Checkpoints(folder, now).load() is None
    assert "cannot be read" in (aside / "WHY").read_text()


def test_a_checkpoint_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A kill while a checkpoint is written leaves the previous one."""
    folder = tmp_path / "checkpoint"
    saved = Checkpoints(folder, {"job": "x"})
    saved.save({"epoch": 1, "epoch_done": True, "global_step": 3})

    def dies_while_writing(state, stream):
        stream.write(b"half a checkpoint")
        raise Killed

    monkeypatch.setattr(checkpoints.torch, "save", dies_while_writing)
    with pytest.raises(Killed):
        saved.save({"epoch": 2, "epoch_done": True, "global_step": 6})
    monkeypatch.undo()
    assert saved.load()["epoch"] == 1


def test_rows_a_kill_left_unlogged_reach_the_run_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "resume", tmp_path / "art", tmp_path)
    with tracking.start_run(experiment, "s/k4/seed0", "s", {}) as run:
        run.log_steps([{"step": s, "train_loss_step": 1.0 / (s + 1)} for s in range(3)])
        run_id = run.run_id
    # the checkpoint covered steps 0-5; the kill came after steps 0-2 were logged
    with tracking.start_run(experiment, "s/k4/seed0", "s", {}, run_id=run_id) as again:
        assert again.reopened and again.run_id == run_id
        rows = [{"step": s, "train_loss_step": 1.0 / (s + 1), "lr": 0.1} for s in range(6)]
        assert again.log_steps_once(rows) == 3 + 6
        assert again.log_steps_once(rows) == 0
    client = again.client
    losses = client.get_metric_history(run_id, "train_loss_step")
    assert sorted(m.step for m in losses) == list(range(6))
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == list(range(6))
    assert client.get_run(run_id).info.status == "FINISHED"
    # a run that is gone is not reopened: a new one starts
    client.delete_run(run_id)
    with tracking.start_run(experiment, "s/k4/seed0", "s", {}, run_id=run_id) as fresh:
        assert not fresh.reopened and fresh.run_id != run_id


# --- the finetune job, killed and rerun ------------------------------------------------------

RUN = "runs/gradual/k4/seed0"
EPOCHS, STEPS = 5, 3  # 20 examples in batches of 8


def gradual_config(model_dir: Path) -> dict:
    """Gradual unfreezing of the tiny BERT, a layer every epoch, for 5 epochs of 3 steps."""
    config = tiny_config(model_dir, experiment="resume")
    config["strategies"] = {
        "gradual": {"kind": "gradual_unfreeze", "every": 1, "train": {"lr": 1e-3}}
    }
    config["baselines"] = []
    config["train"].update(epochs=EPOCHS, batch_size=8)
    config["train"]["checkpoint"] = {"every_seconds": 0}  # a checkpoint every epoch
    return config


def target(flow: Workflow) -> str:
    return str(flow.results("resume").relative_to(flow.root) / RUN / "train_summary.json")


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, tmp_path_factory) -> tuple[Path, bytes, pd.DataFrame]:
    """The workflow run up to the finetune job (a copy kept in ``prepared/``), then the job
    run without a stop: its model's bytes and its history."""
    root = tmp_path_factory.mktemp("resume")
    flow = Workflow(root / "flow", gradual_config(tiny_bert_dir))
    plan = flow.results("resume").relative_to(flow.root) / "plans/k4/gradual.json"
    experiment = flow.results("resume").relative_to(flow.root) / "mlflow_experiment.json"
    flow.run("--cores", "1", str(plan), str(experiment))
    shutil.copytree(flow.root, root / "prepared", symlinks=True)
    flow.run("--cores", "1", target(flow))
    run_folder = flow.results("resume") / RUN
    assert not (run_folder / ".checkpoint").exists()  # removed as the job finished
    history = read_table(run_folder / "history.csv")
    return root / "prepared", (run_folder / "model/model.safetensors").read_bytes(), history


def start_finetune(flow: Workflow, log_name: str) -> subprocess.Popen:
    log = open(flow.root / log_name, "wb")  # noqa: SIM115 - read after the process ends
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "1", target(flow)],
        cwd=flow.root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # The job in its own process (not adaptune's worker), which wait_for_checkpoint stops
        # with SIGSTOP, a signal that a job's process cannot pass on to the worker's.
        env={**os.environ, "ADAPTUNE_WORKER": "off"},
    )


def wait_for_checkpoint(flow: Workflow, process: subprocess.Popen) -> tuple[dict, int]:
    """The first checkpoint the job writes, once it is there, and the training process's pid;
    the process is stopped (SIGSTOP) as soon as the checkpoint is seen, so that a loaded
    machine's slow polling cannot let it finish first: the caller sends the fault, then
    SIGCONT."""
    state = flow.results("resume") / RUN / ".checkpoint/state.pt"
    deadline = time.time() + 600
    while not state.exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    pid = finetune_process(process)
    os.kill(pid, signal.SIGSTOP)
    return torch.load(state, weights_only=True), pid


def finetune_process(process: subprocess.Popen) -> int:
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    scripts = [c.pid for c in children if "finetune.py" in " ".join(c.cmdline())]
    assert scripts, [c.cmdline() for c in children]
    return scripts[0]


def finetune_runs(flow: Workflow) -> tuple[list, object]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{flow.root / 'results/mlflow.db'}")
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    return [r for r in runs if r.data.tags.get("stage") == "finetune"], client


def job_log(flow: Workflow) -> str:
    return (flow.results("resume") / "logs/finetune/gradual/k4/seed0.log").read_text()


@pytest.mark.workflow
@pytest.mark.parametrize(
    "fault",
    ["kill -9", pytest.param("SIGTERM", marks=pytest.mark.slow)],  # the same resume
)
def test_a_killed_finetune_job_resumes_bit_identical_in_its_own_mlflow_run(
    prepared, tiny_bert_dir, tmp_path, fault
):
    template, uninterrupted, uninterrupted_history = prepared
    flow = Workflow(tmp_path / "flow", gradual_config(tiny_bert_dir))
    for done in ("results", ".snakemake"):  # the stages before finetune, as they ended
        shutil.copytree(template / done, flow.root / done, symlinks=True)
    process = start_finetune(flow, "first.log")
    first, pid = wait_for_checkpoint(flow, process)
    assert first["epoch_done"] and first["epoch"] < EPOCHS
    os.kill(pid, signal.SIGKILL if fault == "kill -9" else signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError):  # a stopped process acts on SIGTERM once it
        os.kill(pid, signal.SIGCONT)  # runs again
    assert process.wait(timeout=300) != 0
    state = torch.load(flow.results("resume") / RUN / ".checkpoint/state.pt", weights_only=True)
    runs, client = finetune_runs(flow)
    assert len(runs) == 1
    if fault == "SIGTERM":
        # a checkpoint after the step it was in (or the epoch's validation), then the run
        # ended KILLED
        assert "SIGTERM: saving a checkpoint after this step" in job_log(flow)
        assert state["global_step"] >= first["global_step"]  # stopped right after it: the same
        assert runs[0].info.status == "KILLED"
    else:
        assert runs[0].info.status == "RUNNING"  # nobody could end it
    assert state["epoch"] < EPOCHS or not state["epoch_done"], "it had finished"

    flow.run("--cores", "1", target(flow))  # the profile reruns the incomplete job
    log = job_log(flow)
    assert f"resumed from epoch {state['epoch']}" in log, log[-3000:]
    run_folder = flow.results("resume") / RUN
    assert not (run_folder / ".checkpoint").exists()
    runs, client = finetune_runs(flow)
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    (live,) = runs
    assert live.info.status == "FINISHED" and live.info.lifecycle_stage == "active"
    assert (run_folder / "mlflow_run_id").read_text().strip() == live.info.run_id
    for metric, steps in (
        ("val_macro_f1", range(1, EPOCHS + 1)),
        ("train_loss_step", range(1, EPOCHS * STEPS + 1)),
    ):
        logged = [m.step for m in client.get_metric_history(live.info.run_id, metric)]
        assert sorted(logged) == list(steps), metric  # every epoch and step, once
    # the same bytes and curves as the job never stopped
    assert (run_folder / "model/model.safetensors").read_bytes() == uninterrupted
    columns = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"]
    assert read_table(run_folder / "history.csv")[columns].equals(uninterrupted_history[columns])
    if fault == "kill -9":
        # How often a job checkpoints changes none of its results: changing it reruns nothing.
        config = flow.config
        config["train"]["checkpoint"] = {"every_steps": 2}
        flow.write_config(config)
        assert "finetune" not in flow.dry_run_jobs(target(flow))


@pytest.mark.workflow
def test_epochs_logged_after_the_last_checkpoint_reach_the_resumed_run_once(
    prepared, tmp_path, monkeypatch
):
    """A checkpoint need not follow every epoch (``train.checkpoint.every_seconds``): the
    epochs a killed job logged after its last save run again when it resumes, and their
    values reach its MLflow run once. The finetune job in process, from the prepared
    workflow's files, killed where a step would begin."""
    from adaptune.finetune import FinetuneJob, run_finetune

    template, uninterrupted, _ = prepared
    shutil.copytree(template.parent / "flow" / "results", tmp_path / "results", symlinks=True)
    monkeypatch.chdir(tmp_path)
    job = json.loads((Path("results/resume") / RUN / "settings.json").read_text())["job"]
    # checkpoints at steps 4 (within epoch 2), 8 and 12, never for time
    job["train"]["checkpoint"] = {"enabled": True, "every_steps": 4, "every_seconds": 3600}
    job["outputs"] = {k: v.replace("/seed0/", "/again/") for k, v in job["outputs"].items()}
    folder = Path(job["outputs"]["model"]).parent
    folder.mkdir(parents=True)
    step = training.TrainingLoop.step

    def killed_before_step_8(loop, *args, **kwargs):
        if loop.global_step == 7:  # epoch 2 (steps 4-6) ended and was logged; no save since 4
            raise Killed
        return step(loop, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workflow's job ran (--cores 1)
    try:
        monkeypatch.setattr(training.TrainingLoop, "step", killed_before_step_8)
        with pytest.raises(Killed):
            run_finetune(FinetuneJob.from_dict(job))
        state = Checkpoints(folder / ".checkpoint", {}).read()
        assert (state["epoch"], state["steps_done"], state["global_step"]) == (2, 1, 4)
        run_id = (folder / "mlflow_run_id").read_text().strip()
        client = tracking._client("sqlite:///results/mlflow.db")
        assert [m.step for m in client.get_metric_history(run_id, "val_macro_f1")] == [1, 2]
        monkeypatch.setattr(training.TrainingLoop, "step", step)
        run_finetune(FinetuneJob.from_dict(job))
    finally:
        torch.set_num_threads(threads)
    assert (folder / "mlflow_run_id").read_text().strip() == run_id  # the same run
    for metric, steps in (
        ("val_macro_f1", range(1, EPOCHS + 1)),
        ("train_loss_step", range(1, EPOCHS * STEPS + 1)),
    ):
        logged = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(logged) == list(steps), metric  # epoch 2 and its steps once
    assert (folder / "model/model.safetensors").read_bytes() == uninterrupted
