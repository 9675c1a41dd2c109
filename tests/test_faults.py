"""Bad inputs and faults a user will hit, each with the outcome it must have: a clear error that
names the problem and the fix (and leaves nothing half-written), or the right behaviour.

The cases that need the whole workflow (edits, interruptions, services, full disks) are at the
end, marked ``workflow``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adaptune import tracking
from adaptune.config import read_config_file
from adaptune.data import SPLITS, run_prepare_data
from adaptune.errors import ConfigError, DataError, ModelError
from adaptune.experiment import validate_config
from adaptune.modalities.files import content_fingerprint
from adaptune.modalities.image.sources import load_image_folder, to_rgb_uint8
from adaptune.settings import DataSettings, ModelSettings

from .conftest import Workflow, tiny_config

TOPICS = ("business", "sport", "tech")


def news_rows(per_class: int = 20, offset: int = 0) -> list[dict]:
    """Short distinct texts of three topics (a tiny model learns nothing from them; the data
    stage only needs them distinct)."""
    return [
        {"text": f"{topic} report number {offset + i} on {topic} matters", "label": topic}
        for topic in TOPICS
        for i in range(per_class)
    ]


def csv_file(path: Path, rows: list[dict], **options) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False, **options)
    return path


def prepare(tmp_path: Path, model_dir: Path, **data) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The prepare_data stage into ``tmp_path/out``; on an error, nothing may be left there."""
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / f"{name}.parquet") for name in SPLITS}
    try:
        info = run_prepare_data(
            DataSettings.from_config(data),
            ModelSettings.from_config(f"path:{model_dir}"),
            paths,
            str(out / "data.json"),
        )
    except Exception:
        assert not list(out.iterdir()), "a failed prepare_data left files behind"
        raise
    return info, {name: pd.read_parquet(path) for name, path in paths.items()}


# --- data -------------------------------------------------------------------------------------


def test_exact_duplicates_never_straddle_splits_and_are_counted(tmp_path, tiny_bert_dir, caplog):
    rows = news_rows()
    source = csv_file(tmp_path / "twice.csv", rows + rows)  # every row twice
    info, splits = prepare(tmp_path, tiny_bert_dir, source=f"csv:{source}")
    train, test = set(splits["train"]["text"]), set(splits["test"]["text"])
    assert not train & test
    assert info["duplicates"]["duplicate_copies"] == 60 and info["num_examples"] == 60
    assert "60 example(s) repeat an earlier input exactly: removed" in caplog.text
    kept, splits = prepare(tmp_path / "k", tiny_bert_dir, source=f"csv:{source}", duplicates="keep")
    assert kept["num_examples"] == 120
    assert not set(splits["train"]["text"]) & set(splits["test"]["text"])
    assert all(splits[s]["text"].value_counts().eq(2).all() for s in SPLITS)  # copies stay together


def test_conflicting_labels_for_one_input_are_reported_and_dropped(tmp_path, tiny_bert_dir, caplog):
    rows = news_rows()
    rows.append({"text": rows[0]["text"], "label": "tech"})  # a business text also labelled tech
    info, splits = prepare(
        tmp_path, tiny_bert_dir, source=f"csv:{csv_file(tmp_path / 'c.csv', rows)}"
    )
    report = info["duplicates"]
    assert report["conflicting_inputs"] == 1
    assert report["conflicting_examples"][0]["labels"] == ["business", "tech"]
    assert rows[0]["text"] not in set(pd.concat(splits.values())["text"])
    assert "1 input(s) appear with different labels" in caplog.text


def test_a_csv_that_is_not_utf8_names_the_file_and_data_encoding(tmp_path, tiny_bert_dir):
    rows = [{**r, "text": r["text"] + " café £5"} for r in news_rows()]
    source = csv_file(tmp_path / "latin.csv", rows, encoding="latin-1")
    with pytest.raises(DataError, match=r"latin.csv: not valid utf-8 text .* set data.encoding"):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{source}")
    _info, splits = prepare(tmp_path, tiny_bert_dir, source=f"csv:{source}", encoding="latin-1")
    assert splits["train"]["text"].str.contains("café £5").all()


def test_labels_keep_their_spelling_types_and_lose_stray_whitespace(tmp_path, tiny_bert_dir):
    rows = [
        {"text": f"item {i} of class {label.strip()}", "label": label}
        for i in range(12)
        for label in ("01", "1", " 2 ")
    ]
    info, _ = prepare(tmp_path, tiny_bert_dir, source=f"csv:{csv_file(tmp_path / 'n.csv', rows)}")
    assert info["labels"] == ["01", "1", "2"]  # not 1, 1 and 2.0


def test_labels_that_differ_only_in_case_are_refused(tmp_path, tiny_bert_dir):
    rows = [*news_rows(), {"text": "another sport story", "label": "Sport"}]
    with pytest.raises(DataError, match=r"labels 'Sport' / 'sport' differ only in case"):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{csv_file(tmp_path / 'c.csv', rows)}")


def test_line_breaks_inside_texts_and_very_long_texts(tmp_path, tiny_bert_dir):
    rows = news_rows()
    rows[0]["text"] = "first line\r\nsecond line, with a comma\rthird"
    rows[1]["text"] = "word " * 5000
    info, splits = prepare(
        tmp_path, tiny_bert_dir, source=f"csv:{csv_file(tmp_path / 'l.csv', rows)}", max_length=16
    )
    texts = pd.concat(splits.values()).set_index("example_id")["text"]
    assert info["num_examples"] == 60
    assert texts[0] == "first line\nsecond line, with a comma\nthird"
    assert all(len(ids) <= 16 for s in splits.values() for ids in s["input_ids"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\n", r"no examples"),
        ("", r"the file is empty"),
        ('text,label\n"unclosed,x\n', r"not a well-formed CSV|no examples|only one class"),
    ],
    ids=["header only", "empty file", "broken quoting"],
)
def test_empty_or_broken_csv_files_are_named(tmp_path, tiny_bert_dir, content, message):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{tmp_path / 'bad.csv'}")


def test_a_class_too_small_to_reach_every_split_is_named(tmp_path, tiny_bert_dir):
    rows = [*news_rows(), {"text": "the only weather story", "label": "weather"}]
    with pytest.raises(DataError, match=r"\{'weather': 1\} have fewer than 3 examples"):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{csv_file(tmp_path / 'w.csv', rows)}")


def test_a_folder_where_a_file_is_expected(tmp_path, tiny_bert_dir):
    (tmp_path / "data.csv").mkdir()
    with pytest.raises(DataError, match=r"data.csv is a folder, not a file"):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{tmp_path / 'data.csv'}")


def test_a_hub_dataset_that_cannot_be_reached_names_the_id_and_the_network(
    tmp_path, tiny_bert_dir, monkeypatch
):
    pytest.importorskip("datasets", reason="the hf extra is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'nobody/no-such-set'.*unreachable .* or no dataset"):
        prepare(tmp_path, tiny_bert_dir, source="hf:nobody/no-such-set")


# --- images -----------------------------------------------------------------------------------


def test_image_modes_and_depths_become_8_bit_rgb(tmp_path):
    from PIL import Image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 16-bit, to 65,520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        deep = to_rgb_uint8(image)
    assert deep.dtype == np.uint8 and deep.shape == (64, 64, 3)
    assert (deep[..., 0] == 255).mean() < 0.01  # scaled, not clipped to white
    assert abs(int(deep[32, 32, 0]) - round(int(ramp[32, 32]) * 255 / 65535)) <= 1
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert to_rgb_uint8(image)[0, 0].tolist()[0] > 200  # red stays red
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert to_rgb_uint8(palette)[0, 0].tolist() == [0, 0, 255]
    assert to_rgb_uint8(np.ones((3, 3), np.float32)).max() == 255


def test_an_empty_class_folder_is_skipped_with_a_warning(tmp_path, caplog):
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "birds").mkdir()
    (tmp_path / "birds" / "notes.txt").write_text("no images here")
    frame = load_image_folder(tmp_path)
    assert sorted(frame["label"].unique()) == ["cats", "dogs"]
    assert "no images in class folder 'birds'; the class is skipped" in caplog.text


# --- models -----------------------------------------------------------------------------------


def test_a_path_model_that_is_not_a_model(tmp_path, tiny_bert_dir):
    base = {"experiment": "x", "data": {"source": "bundled:bbc-news"}}
    with pytest.raises(ConfigError, match=r"path:.*nothing.*does not exist"):
        validate_config({**base, "model": {"name": f"path:{tmp_path / 'nothing'}"}})
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=r"is neither .*, nor .*\(config.json\)"):
        validate_config({**base, "model": {"name": f"path:{tmp_path / 'folder'}"}})
    (tmp_path / "folder" / "config.json").write_text('{"hello": 1}')
    with pytest.raises(ModelError, match=r"cannot load the tokenizer from .*folder"):
        prepare(tmp_path, tmp_path / "folder", source="bundled:bbc-news")


def test_a_hub_model_that_cannot_be_reached_names_the_id_and_the_network(monkeypatch):
    from adaptune.modalities.text.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"'nobody/no-model'.*unreachable.*or no model has that"):
        load_tokenizer("hf:nobody/no-model")


@pytest.mark.workflow
def test_a_hub_model_is_fetched_once_before_any_job_that_loads_it(tmp_path, tiny_bert_dir):
    """An hf: model (or dataset) is fetched by the local ``fetch`` stage, first; local data and
    models need none. Offline, the fetch fails naming the id, and nothing after it runs."""
    config = csv_config(tiny_bert_dir, csv_file(tmp_path / "n.csv", news_rows()))
    flow = Workflow(tmp_path / "flow", config)
    assert "fetch" not in flow.dry_run_jobs()
    config["model"] = {"name": "hf:nobody/no-such-model"}
    flow.write_config(config)
    assert flow.dry_run_jobs()["fetch"] == 1
    order = flow.run("-n", "--cores", "1", "--until", "prepare_data").stdout
    assert order.index("rule fetch") < order.index("rule prepare_data")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        result = flow.run("--cores", "1", check=False)
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert result.returncode != 0
    log = (flow.results("faults") / "logs/fetch.log").read_text()
    assert re.search(r"'nobody/no-such-model'.*unreachable", log), log[-2000:]
    assert not (flow.results("faults") / "data").exists()  # nothing after the fetch ran


class Payload:
    """Not a tensor: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickled_text_checkpoint_is_not_unpickled(tmp_path, tiny_bert_dir, capfd):
    """A model folder whose weights are a pickle (pytorch_model.bin) with code in it: refused
    (transformers reads it with weights_only=True), and the code never runs."""
    import shutil

    from adaptune.modalities.text import MODALITY

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"cannot load the model from .*Weights only load failed"):
        MODALITY.load_pretrained(ModelSettings.from_config(f"path:{folder}"), ["a", "b"], 0, {})
    assert "pickled code ran" not in capfd.readouterr().out


def test_cuda_on_a_machine_without_one_stops_at_parse_time_naming_the_key():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    experiment = {
        "experiment": "x",
        "data": {"source": "bundled:bbc-news"},
        "model": {"name": "bundled:all-MiniLM-L6-v2"},
        "train": {"device": "cuda"},
        "mlflow": {"tracking_uri": "file:/tmp/unused"},
    }
    with pytest.raises(ConfigError, match=r"train.device = 'cuda', but this machine has 0 CUDA"):
        validate_config(experiment, main_process=True)
    validate_config(experiment)  # a job (on a GPU node of a cluster, say) does not check it


@pytest.mark.workflow
def test_cuda_without_one_stops_a_local_run_before_any_job_but_not_a_dry_run(
    tmp_path, tiny_bert_dir
):
    """The executor is known only when execution starts: a local run stops there (nothing
    ran); a dry run, or a cluster run whose jobs land on GPU nodes, goes on."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = csv_config(tiny_bert_dir, csv_file(tmp_path / "n.csv", news_rows()))
    config["train"]["device"] = "cuda"
    flow = Workflow(tmp_path / "flow", config)
    assert "finetune" in flow.dry_run_jobs()
    result = flow.run("--cores", "2", check=False)
    assert result.returncode != 0
    assert "train.device = 'cuda', but this machine has 0 CUDA" in result.stdout + result.stderr
    assert not (flow.root / "results").exists()  # nothing ran


# --- config -----------------------------------------------------------------------------------


def test_yaml_mistakes_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("experiment: x\ndata:\n  source: bundled:bbc-news\n  shots: [16\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"my.yaml, line 5, column 6: not valid YAML"):
        read_config_file(path)
    path.write_text("experiment: x\n\tdata: 1\n")
    with pytest.raises(ConfigError, match=r"my.yaml, line 2, column 1: not valid YAML.*\\t|tab"):
        read_config_file(path)


# --- tracking ---------------------------------------------------------------------------------


def test_a_corrupt_mlflow_database_is_named(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x00garbage, not a database" * 10)
    with pytest.raises(ConfigError, match=rf"{db}.* is not an SQLite database .* move it aside"):
        tracking.check_store(f"sqlite:///{db}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_tracking_server_fails_in_seconds():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"no MLflow server answers at http://127.0.0.1"):
        tracking.check_store(f"http://127.0.0.1:{free_port()}")
    assert time.perf_counter() - start < 10


def test_a_deleted_experiment_says_how_to_restore_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "gone", tmp_path / "art", tmp_path)
    MlflowClient(uri).delete_experiment(experiment["experiment_id"])
    with pytest.raises(
        ConfigError, match=r"'gone' .* is deleted: restore it .*experiments restore"
    ):
        tracking.ensure_experiment(uri, "gone", tmp_path / "art", tmp_path)


# --- reproducibility --------------------------------------------------------------------------


def test_a_fixed_seed_gives_byte_identical_weights_on_cpu(tmp_path, tiny_bert_dir):
    from adaptune.modalities.text import MODALITY
    from adaptune.plans import Plan, TensorPlan
    from adaptune.settings import TrainSettings
    from adaptune.training import finetune

    from .test_training import TEXT, frame

    def trained(folder: Path) -> bytes:
        model = ModelSettings.from_config(f"path:{tiny_bert_dir}")
        task = MODALITY.load_pretrained(model, ["a", "b", "c"], 5, {})
        tensors = [
            TensorPlan(n, "l", 0, p.numel(), False, 1.0, "")
            for n, p in task.model.named_parameters()
        ]
        train = TrainSettings.from_config({"epochs": 2, "batch_size": 4, "lr": 1e-3})
        finetune(
            task,
            Plan("full", "full", tensors),
            frame(12, 0),
            frame(6, 1),
            train,
            5,
            TEXT,
            torch.device("cpu"),
        )
        MODALITY.save(task, folder, model, {**TEXT, "max_length": 32})
        return (folder / "model.safetensors").read_bytes()

    assert trained(tmp_path / "a") == trained(tmp_path / "b")


# --- the workflow -----------------------------------------------------------------------------


def csv_config(model_dir: Path, source: Path, experiment: str = "faults") -> dict:
    config = tiny_config(model_dir, experiment=experiment, source=f"csv:{source}")
    config["data"]["shots"] = [2]
    config["importance"] = {"metrics": ["weight_l1", "grad_norm"], "batches": 1, "batch_size": 4}
    config["strategies"] = {"full": {"kind": "full"}}
    config["baselines"] = []
    return config


@pytest.mark.workflow
def test_an_edited_source_file_reruns_the_data_stage_and_what_follows(tmp_path, tiny_bert_dir):
    source = csv_file(tmp_path / "news.csv", news_rows(20))  # 60 rows, 3 classes
    flow = Workflow(tmp_path / "flow", csv_config(tiny_bert_dir, source))
    flow.run("--cores", "2")
    assert flow.dry_run_jobs() == {}
    csv_file(source, news_rows(20))  # written again, byte for byte: nothing to redo
    assert flow.dry_run_jobs() == {}
    csv_file(source, [r for r in news_rows(15) if r["label"] != "tech"])  # 30 rows, 2 classes
    jobs = flow.dry_run_jobs()
    assert jobs["prepare_data"] == 1 and jobs["finetune"] == 1 and jobs["report"] == 1
    flow.run("--cores", "2")
    info = json.loads((flow.results("faults") / "data/data.json").read_text())
    assert info["labels"] == ["business", "sport"] and info["num_examples"] == 30
    assert info["source_fingerprint"] == content_fingerprint([source])
    board = pd.read_csv(flow.results("faults") / "report/leaderboard.csv")
    assert (board["test_examples"] == 6).all()  # 20% of the 30 new rows


@pytest.mark.workflow
def test_a_new_tracking_uri_retrains_nothing(tmp_path, tiny_bert_dir):
    flow = Workflow(tmp_path, csv_config(tiny_bert_dir, csv_file(tmp_path / "n.csv", news_rows())))
    flow.run("--cores", "2")
    config = flow.config
    config["mlflow"]["tracking_uri"] = "sqlite:///results/other.db"
    flow.write_config(config)
    jobs = flow.dry_run_jobs()
    assert not {"prepare_data", "finetune", "evaluate", "score_importance"} & set(jobs), jobs


def live_runs(db: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    from mlflow.entities import ViewType

    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)


def start_until_training(flow: Workflow) -> subprocess.Popen:
    """Start the workflow in the background and return once a finetune job has started its
    MLflow run (its run-id file exists) and is training."""
    log = open(flow.root / "snakemake.log", "wb")  # noqa: SIM115 - read by wait_or_explain
    process = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "1"],
        cwd=flow.root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # As in a terminal's foreground. Started in the background by a non-interactive shell
        # (as a CI runner may start the suite), every process inherits SIGINT ignored: Python
        # then never raises KeyboardInterrupt and snakemake goes on scheduling jobs after
        # "Ctrl-C" (what made this test hang in CI once; reproduced with `nohup ... &`).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    run_id = flow.results("faults") / "runs/full/k2/seed0/mlflow_run_id"
    deadline = time.time() + 240
    while not run_id.exists():
        assert process.poll() is None and time.time() < deadline, "finetune never started"
        time.sleep(0.5)
    time.sleep(3)
    return process


def wait_or_explain(process: subprocess.Popen, flow: Workflow, timeout: float) -> int:
    """``process``'s exit code; if it is still running after ``timeout`` seconds, kill its
    process group and fail with its log and the processes it had left."""
    import psutil

    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [
            f"{c.pid} {c.status()} {' '.join(c.cmdline())[:200]}"
            for c in psutil.Process(process.pid).children(recursive=True)
        ]
        os.killpg(process.pid, signal.SIGKILL)
        log = (flow.root / "snakemake.log").read_text()[-4000:]
        pytest.fail(f"still running after {timeout} s; processes:\n" + "\n".join(tree) + log)


def finetune_job(process: subprocess.Popen) -> int:
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    jobs = [c.pid for c in children if "finetune" in " ".join(c.cmdline())]
    assert jobs, [c.cmdline() for c in children]
    return jobs[0]


@pytest.mark.workflow
@pytest.mark.parametrize("fault", ["kill -9 the job", "Ctrl-C snakemake"])
def test_an_interrupted_run_leaves_one_live_run_per_key_with_all_its_metrics(
    tmp_path, tiny_bert_dir, fault
):
    config = csv_config(tiny_bert_dir, csv_file(tmp_path / "n.csv", news_rows()))
    config["train"]["epochs"] = 400  # long enough to be interrupted while training
    flow = Workflow(tmp_path / "flow", config)
    process = start_until_training(flow)
    if fault == "kill -9 the job":
        os.kill(finetune_job(process), signal.SIGKILL)
    else:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    assert wait_or_explain(process, flow, timeout=180) != 0
    config["train"]["epochs"] = 1
    flow.write_config(config)
    flow.run("--cores", "2")  # the profile reruns incomplete jobs
    runs = live_runs(flow.root / "results/mlflow.db", "faults")
    tuned = [r for r in runs if r.data.tags.get("stage") == "finetune"]
    live = [r for r in tuned if r.info.lifecycle_stage == "active"]
    dead = [r for r in tuned if r.info.lifecycle_stage == "deleted"]
    assert len(live) == 1 and live[0].info.status == "FINISHED"
    assert {"test_macro_f1", "train_loss", "val_macro_f1"} <= set(live[0].data.metrics)
    assert len(dead) == 1 and dead[0].info.status in ("KILLED", "FAILED")
    assert dead[0].data.tags[tracking.SUPERSEDED_TAG] == live[0].info.run_id


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("ro,size=1m", r"Read-only file system"),
        ("size=200k", r"No space left on device|database or disk is full"),
    ],
    ids=["read-only results", "full disk"],
)
def test_a_results_folder_that_cannot_be_written(tmp_path, tiny_bert_dir, options, message):
    """The job that cannot write fails, naming why, and leaves none of its outputs; what other
    jobs finished is whole."""
    import re

    flow = Workflow(tmp_path, csv_config(tiny_bert_dir, csv_file(tmp_path / "n.csv", news_rows())))
    results = flow.root / "results"
    mount_tmpfs(results, options)
    try:
        result = flow.run("--cores", "2", check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and re.search(message, output), output[-2000:]
        assert not (results / "faults/mlflow_experiment.json").exists()
        assert not (results / "faults/report").exists()
        for table in results.rglob("*.parquet"):
            pd.read_parquet(table)  # whole, or not there
        for info in results.rglob("data.json"):
            json.loads(info.read_text())
    finally:
        subprocess.run(["umount", str(results)], check=True)


@pytest.mark.workflow
def test_the_workflow_refuses_bad_setups_before_any_job(tmp_path, tiny_bert_dir):
    flow = Workflow(tmp_path, csv_config(tiny_bert_dir, csv_file(tmp_path / "n.csv", news_rows())))
    (flow.root / "config/config.yaml").write_text("experiment: x\ndata: {source: [\n")
    result = flow.run("-n", check=False)
    assert "config.yaml, line 3, column 1: not valid YAML" in result.stderr + result.stdout
    config = csv_config(tiny_bert_dir, tmp_path / "n.csv")
    config["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    flow.write_config(config)
    start = time.perf_counter()
    result = flow.run("--cores", "2", check=False)
    assert result.returncode != 0 and time.perf_counter() - start < 30
    assert "no MLflow server answers" in result.stderr + result.stdout
    assert not (flow.root / "results").exists()  # nothing ran
    config["mlflow"]["tracking_uri"] = "sqlite:///results/mlflow.db"
    config["trian"] = {}
    flow.write_config(config)
    result = flow.run("-n", check=False)
    output = result.stdout + result.stderr
    assert "the config: unknown key 'trian'; allowed here: baselines, data" in output
    assert len(output.splitlines()) < 15  # one line, not a schema dump


def test_every_case_here_is_in_the_readme():
    """The README's "When something goes wrong" section tells users what these tests check."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "## When something goes wrong" in readme
    for phrase in ("--unlock", "data.encoding", "data.duplicates", "superseded", "adaptune check"):
        assert phrase in readme, phrase


def test_a_moved_results_folder_keeps_its_mlflow_artifacts(tmp_path, monkeypatch):
    """MLflow records absolute artifact paths: after the project (results/ with its SQLite
    store) is moved, the workflow's start points them at the new place, and the UI and the
    client find every artifact again."""
    from mlflow.tracking import MlflowClient

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.chdir(old)
    uri = "sqlite:///results/mlflow.db"
    experiment = tracking.ensure_experiment(uri, "moved", "results/moved/mlartifacts", "results")
    with tracking.start_run(experiment, "full/k2/seed0", "run", {}) as run:
        (old / "note.txt").write_text("kept\n")
        run.log_artifact(old / "note.txt")
    old.rename(new)
    monkeypatch.chdir(new)
    client = MlflowClient(uri)
    assert not client.list_artifacts(run.run_id)  # the recorded folder is gone
    assert tracking.relocate_artifacts(uri, "moved", "results/moved/mlartifacts")
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["note.txt"]
    assert client.get_run(run.run_id).info.artifact_uri.startswith((new / "results").as_uri())
    assert not tracking.relocate_artifacts(uri, "moved", "results/moved/mlartifacts")  # once
