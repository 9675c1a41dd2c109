"""Bad inputs and faults a user will hit, each with the outcome it must have: a clear error that
names the problem and the fix (and leaves nothing half-written), or the right behaviour.

The cases that need the whole workflow (edits, interruptions, services, full disks) are at the
end, marked ``workflow``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
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
from adaptune.data_info import DataInfo
from adaptune.errors import ConfigError, DataError, ModelError
from adaptune.experiment import validate_config
from adaptune.modalities.files import content_fingerprint
from adaptune.modalities.image.sources import load_image_folder, to_rgb_uint8
from adaptune.settings import DataSettings, ModelSettings

from .conftest import Workflow, tiny_config, tiny_task

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
    data = {"max_length": 32, **data}  # the tiny BERT embeds 128 positions
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
    return info.to_dict(), {name: pd.read_parquet(path) for name, path in paths.items()}


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


@pytest.mark.parametrize(
    ("name", "separator", "said"),
    [
        ("semicolons.csv", ";", "semicolon (';') (it splits the header line into text, label)"),
        ("tabs.csv", "\t", "tab ('\\t') (it splits the header line into text, label)"),
        ("tabs.tsv", "\t", "tab ('\\t') (the file ends in .tsv)"),
        ("bars.txt", "|", "vertical bar ('|') (it splits the header line into text, label)"),
        ("news.csv.gz", ",", "comma (',') (it splits the header line into text, label)"),
        ("semicolons.csv.bz2", ";", "semicolon (';') (it splits the header line into"),
        ("tabs.tsv.xz", "\t", "tab ('\\t') (the file ends in .tsv.xz)"),
    ],
)
def test_a_csv_is_read_with_its_own_separator(
    tmp_path, tiny_bert_dir, name, separator, said, caplog
):
    """Semicolons (a spreadsheet's CSV in many locales), a TSV given as csv:, a .tsv file,
    vertical bars and compressed files (the separator found in what they hold): each read
    whole, texts holding commas and the other separators intact."""
    caplog.set_level("INFO")
    rows = [{**r, "text": r["text"] + ", then; more | text"} for r in news_rows()]
    source = csv_file(tmp_path / name, rows, sep=separator)
    info, splits = prepare(tmp_path, tiny_bert_dir, source=f"csv:{source}")
    assert info["num_examples"] == 60 and info["labels"] == list(TOPICS)
    assert pd.concat(splits.values())["text"].str.endswith(", then; more | text").all()
    assert f"fields separated by {said}" in caplog.text


def test_a_csv_that_does_not_parse_names_the_separator_it_tried(tmp_path, tiny_bert_dir):
    rows = news_rows()
    rows = rows[:5] + [{**r, "text": r["text"] + ", and more"} for r in rows[5:]]
    source = csv_file(tmp_path / "tabs.csv", rows, sep="\t")
    with pytest.raises(
        DataError,
        match=r"tabs.csv: not a well-formed CSV with the fields separated by comma \(','\) "
        r"\(data.separator\): .*Expected 1 fields in line 7, saw 2.* set data.separator",
    ):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{source}", separator=",")
    semicolons = csv_file(tmp_path / "semicolons.csv", news_rows(), sep=";")
    with pytest.raises(
        DataError,
        match=r"its columns are \['text;label'\] \(fields separated by comma \(','\): "
        r"data.separator\)\. Set data.text_column and data.label_column, or data.separator",
    ):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{semicolons}", separator=",")


def test_a_column_named_twice_in_the_header_is_refused(tmp_path, tiny_bert_dir):
    lines = ["text,label,label"] + [f"{r['text']},{r['label']},x" for r in news_rows()]
    (tmp_path / "twice.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"twice.csv: its header names 'label' 2 times; .*rename"):
        prepare(tmp_path, tiny_bert_dir, source=f"csv:{tmp_path / 'twice.csv'}")


def test_integral_float_labels_are_named_as_integers(tmp_path, tiny_bert_dir, caplog):
    """A numeric label column with a gap is saved as floats (0.0, 1.0): the classes are 0 and
    1, not '0.0' and '1.0'; where renaming would merge two classes, the log says why not."""
    rows = [
        {"text": f"story {i} of class {label}", "label": label}
        for i in range(12)
        for label in (0.0, 1.0, 2.0)
    ]
    info, splits = prepare(
        tmp_path, tiny_bert_dir, source=f"csv:{csv_file(tmp_path / 'f.csv', rows)}"
    )
    assert info["labels"] == ["0", "1", "2"]
    assert set(splits["train"]["label"]) == {"0", "1", "2"}
    assert "labels '0.0', '1.0', '2.0' are integers written as floats" in caplog.text
    mixed = [{**r, "label": "1" if r["label"] == 2.0 else r["label"]} for r in rows]
    info, _ = prepare(
        tmp_path / "m", tiny_bert_dir, source=f"csv:{csv_file(tmp_path / 'm.csv', mixed)}"
    )
    assert info["labels"] == ["0.0", "1", "1.0"]
    assert "would merge classes '1', '1.0': every label is kept as written" in caplog.text


@pytest.mark.parametrize(
    ("per_class", "val_size", "test_size", "message"),
    [
        (
            3,
            0.1,
            0.2,
            r"30 examples of 10 classes split into 21 train, 3 validation and 6 test "
            r".* 10 per split. Set data.val_size = 0.32 and data.test_size = 0.31$",
        ),
        (
            4,
            0.45,
            0.45,
            r"into 4 train, 18 validation and 18 test .* Lower data.val_size or "
            r"data.test_size$",
        ),
    ],
    ids=["fractions too small", "fractions already large"],
)
def test_too_many_classes_for_the_split_names_the_fractions_that_would_work(
    per_class, val_size, test_size, message
):
    from adaptune.data import split_examples

    frame = pd.DataFrame({"label": [f"c{i}" for i in range(10) for _ in range(per_class)]}).assign(
        example_id=lambda f: range(len(f))
    )
    with pytest.raises(DataError, match=message):
        split_examples(frame, val_size, test_size, seed=0)
    if val_size < 0.3:  # the fractions the message proposes work
        parts = split_examples(frame, 0.32, 0.31, seed=0)
        assert {name: part["label"].nunique() for name, part in parts.items()} == dict.fromkeys(
            ("train", "val", "test"), 10
        )


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


def test_every_unreadable_image_is_named_at_once_or_skipped_and_counted(
    tmp_path, tiny_vision_dir, caplog
):
    """Three broken files (not an image, a truncated JPEG, an empty file) in one folder: one
    error names all three; with data.unreadable_images: skip the others are prepared and
    data.json counts the three."""
    import io

    from PIL import Image

    root = tmp_path / "images"
    for green, label in enumerate(("cats", "dogs")):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 40, 80 * green, 0)).save(root / label / f"{i}.png")
    (root / "cats" / "notes.png").write_bytes(b"not an image")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, "JPEG")
    (root / "dogs" / "cut.jpg").write_bytes(jpeg.getvalue()[:200])
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    paths = {name: str(out / f"{name}.parquet") for name in SPLITS}
    model = ModelSettings.from_config(f"path:{tiny_vision_dir}")
    data = {"source": f"imagefolder:{root}", "val_size": 0.25, "test_size": 0.25}
    with pytest.raises(DataError) as failure:
        run_prepare_data(DataSettings.from_config(data), model, paths, str(out / "data.json"))
    message = str(failure.value)
    assert "3 of 15 image(s) cannot be decoded" in message
    for name in ("cats/notes.png", "dogs/cut.jpg", "dogs/empty.jpg"):
        assert name in message
    assert "data.unreadable_images: skip" in message
    data["unreadable_images"] = "skip"
    info = run_prepare_data(DataSettings.from_config(data), model, paths, str(out / "data.json"))
    assert info.num_examples == 12 and info.unreadable_images["count"] == 3
    written = json.loads((out / "data.json").read_text())["unreadable_images"]
    assert DataInfo.read(out / "data.json").unreadable_images == written  # not its encoding
    assert [line.split(":")[0].rsplit("/", 2)[-2:] for line in written["files"]] == [
        ["cats", "notes.png"],
        ["dogs", "cut.jpg"],
        ["dogs", "empty.jpg"],
    ]
    assert caplog.text.count("skipped (data.unreadable_images: skip)") == 3


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
    import huggingface_hub.constants

    from adaptune.modalities.text.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read when huggingface_hub is imported: without it, the Hub is retried for about 45 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
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

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"cannot load the model from .*Weights only load failed"):
        tiny_task(folder, ["a", "b"])
    assert "pickled code ran" not in capfd.readouterr().out


def test_max_length_beyond_the_models_positions_stops_at_startup(tiny_bert_dir):
    """MiniLM embeds 512 positions; the tiny BERT 128: a longer data.max_length fails at the
    first long text otherwise (a tensor size mismatch in score_importance)."""
    base = {"experiment": "x", "data": {"source": "bundled:bbc-news", "max_length": 4096}}
    with pytest.raises(
        ConfigError,
        match=r"data.max_length = 4096, but the model bundled:all-MiniLM-L6-v2 takes at most "
        r"512 tokens \(max_position_embeddings in its config.json\); set data.max_length to 512",
    ):
        validate_config({**base, "model": {"name": "bundled:all-MiniLM-L6-v2"}})
    tiny = {"name": f"path:{tiny_bert_dir}"}
    with pytest.raises(ConfigError, match=r"= 129, but the model path:.* at most 128 tokens"):
        validate_config({**base, "data": {**base["data"], "max_length": 129}, "model": tiny})
    validate_config({**base, "data": {**base["data"], "max_length": 128}, "model": tiny})


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


def test_a_store_that_does_not_answer_costs_a_job_its_record_not_its_work(caplog, monkeypatch):
    """A job's run is best effort: the first failed call is told once, naming the store, and
    the job goes on (it writes its files; the next workflow run logs them)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    experiment = {"tracking_uri": uri, "experiment_id": "1", "workspace": "w"}
    trained = False
    with tracking.start_run(experiment, "full/k2/seed0", "full-k2-seed0", {}) as run:
        run.log_params({"lr": 0.001})
        run.log_metrics({"val_macro_f1": 0.5}, step=1)
        run.logged("finetune")
        trained = True
    assert trained and run.run_id == "" and run.failure == "MlflowException: Connection refused"
    told = f"MLflow at {uri} stopped answering (MlflowException: Connection refused): this job"
    assert caplog.text.count(told) == 1
    relogging = tracking.start_run(experiment, "full/k2/seed0", "run", {}, best_effort=False)
    with pytest.raises(Exception, match="Connection refused"), relogging:  # not best effort
        pass
    # A job resuming from its checkpoint: the store's silence is a failure of the run (the job
    # trains on from its checkpoint), not a run that cannot be reopened (it would start over).
    with tracking.start_run(experiment, "full/k2/seed0", "run", {}, run_id="0" * 32) as run:
        assert not run.reopened and run.failure == "MlflowException: Connection refused"


def test_a_resumed_job_whose_run_is_not_in_the_store_gets_a_new_run(tmp_path):
    """The run id a checkpoint names, in a store that never held it (replaced, or another):
    a new run of the key, the store answering (so the job starts over, as main's resume
    promises for a run it cannot reopen)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "resumed", tmp_path / "art", tmp_path)
    with tracking.start_run(experiment, "full/k2/seed0", "run", {}) as first:
        pass
    with tracking.start_run(experiment, "full/k2/seed0", "run", {}, run_id="0" * 32) as run:
        assert not run.reopened and run.failure is None and run.run_id != first.run_id
    with tracking.start_run(experiment, "full/k2/seed0", "run", {}, run_id=run.run_id) as again:
        assert again.reopened and again.run_id == run.run_id


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
    from adaptune import training
    from adaptune.plans import Plan, TensorPlan
    from adaptune.settings import TrainSettings

    from .test_training import frame

    def trained(folder: Path) -> bytes:
        model = ModelSettings.from_config(f"path:{tiny_bert_dir}")
        task = tiny_task(tiny_bert_dir, ["a", "b", "c"], seed=5)
        tensors = [
            TensorPlan(n, "l", 0, p.numel(), False, 1.0, "")
            for n, p in task.model.named_parameters()
        ]
        train = TrainSettings.from_config({"epochs": 2, "batch_size": 4, "lr": 1e-3})
        training.train(
            task,
            Plan("full", "full", tensors),
            frame(12, 0),
            frame(6, 1),
            train,
            5,
            torch.device("cpu"),
        )
        task.modality.save(task, folder, model)
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
@pytest.mark.parametrize(
    "fault",  # killing the job is also test_checkpoints' fault, so that case is a slow one
    [pytest.param("kill -9 the job", marks=pytest.mark.slow), "Ctrl-C snakemake"],
)
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


def test_every_case_here_is_in_the_troubleshooting_page():
    """docs/troubleshooting.md ("When something goes wrong") tells users what these tests check."""
    page = (Path(__file__).parents[1] / "docs" / "troubleshooting.md").read_text()
    assert "# When something goes wrong" in page
    for phrase in ("--unlock", "data.encoding", "data.duplicates", "superseded", "adaptune check"):
        assert phrase in page, phrase


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


@pytest.mark.workflow
def test_a_job_that_fails_on_a_data_problem_says_so_in_one_line(tmp_path, tiny_bert_dir):
    """What the terminal shows of a job that fails on a problem adaptune names: the cause and
    the fix in one line, and where the traceback is; not the traceback."""
    rows = [r for r in news_rows() if r["label"] == "sport"]
    source = csv_file(tmp_path / "one.csv", rows)
    flow = Workflow(tmp_path / "flow", csv_config(tiny_bert_dir, source))
    result = flow.run("--cores", "1", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(
        r"^DataError: csv:.*one.csv: only one class \('sport'\); a classifier needs two or more "
        r"\(traceback: results/faults/logs/prepare_data.log\)$",
        output,
        re.MULTILINE,
    ), output[-3000:]
    assert "Traceback" not in output
    log = (flow.results("faults") / "logs/prepare_data.log").read_text()
    assert "Traceback (most recent call last)" in log and "only one class" in log


# --- what a user deletes, and the MLflow store as a view of the files --------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert_dir) -> Workflow:
    """A complete run (two seeds of one strategy, and a baseline) that the tests below delete
    parts of; each leaves it complete again."""
    root = tmp_path_factory.mktemp("finished")
    config = csv_config(tiny_bert_dir, csv_file(root / "n.csv", news_rows()))
    config["train"]["seeds"] = [0, 1]
    config["baselines"] = ["tfidf_logreg"]
    flow = Workflow(root / "flow", config)
    flow.run("--cores", "2")
    return flow


@pytest.mark.workflow
def test_an_edited_source_file_reruns_the_data_stage_and_what_follows(finished):
    """The source's content decides, not its time stamp: the same bytes written again redo
    nothing; other rows redo the data stage and every job after it (the old rows written back
    leave the run complete again)."""
    source = Path(finished.config["data"]["source"].removeprefix("csv:"))
    info = json.loads((finished.results("faults") / "data/data.json").read_text())
    assert info["source_fingerprint"] == content_fingerprint([source])
    csv_file(source, news_rows())  # written again, byte for byte: nothing to redo
    assert finished.dry_run_jobs() == {}
    csv_file(source, [r for r in news_rows(15) if r["label"] != "tech"])  # 30 rows, 2 classes
    jobs = finished.dry_run_jobs()
    assert jobs["prepare_data"] == 1 and jobs["finetune"] == 2 and jobs["report"] == 1
    csv_file(source, news_rows())
    assert finished.dry_run_jobs() == {}


@pytest.mark.workflow
def test_deleted_outputs_are_rebuilt_with_the_jobs_after_them(finished):
    """A model folder, a metrics file and a data split, deleted after a complete run: a dry
    run lists what rebuilds each, and a plain run rebuilds them (the same weights)."""
    results = finished.results("faults")
    first, second = results / "runs/full/k2/seed0", results / "runs/full/k2/seed1"
    weights = (first / "model/model.safetensors").read_bytes()
    shutil.rmtree(first / "model")
    assert finished.dry_run_jobs() == {"finetune": 1, "evaluate": 1, "report": 1, "all": 1}
    (second / "metrics.json").unlink()
    assert finished.dry_run_jobs() == {"finetune": 1, "evaluate": 2, "report": 1, "all": 1}
    (results / "data/val_k2.parquet").unlink()
    jobs = {"sample_few_shot": 1, "finetune": 2, "evaluate": 2, "report": 1, "all": 1}
    assert finished.dry_run_jobs() == jobs
    finished.run("--cores", "2")
    assert (first / "model/model.safetensors").read_bytes() == weights
    assert json.loads((second / "metrics.json").read_text())["test_examples"] == 12
    assert (results / "data/val_k2.parquet").is_file()
    assert finished.dry_run_jobs() == {}


def store_runs(uri: str, name: str) -> dict:
    """The live runs of experiment ``name`` by their key (``adaptune.key``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    keys = [run.data.tags[tracking.KEY_TAG] for run in runs]
    assert len(keys) == len(set(keys)), keys  # one live run per key
    return {run.data.tags[tracking.KEY_TAG]: run for run in runs}


def file_run_ids(results: Path) -> dict:
    """The run id each run's files name, by MLflow key."""
    ids = {}
    for path in results.rglob("mlflow_run_id"):
        parts = path.relative_to(results).parts
        key = "/".join(parts[1:-1])  # runs/full/k2/seed0 -> full/k2/seed0
        ids[key] = path.read_text().strip()
    return ids


def artifact_paths(client, run_id: str, folder: str | None = None) -> set:
    found = set()
    for item in client.list_artifacts(run_id, folder):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.workflow
def test_a_deleted_mlflow_store_is_rebuilt_from_the_files_without_retraining(finished):
    """Every run comes back, from its files alone: its params, curves, metrics, artifacts,
    datasets, model and the registry's champion, as they were logged by the jobs (but for
    the per-step curves and system metrics, which only MLflow held); nothing reruns."""
    from mlflow.tracking import MlflowClient

    results, db = finished.results("faults"), finished.root / "results/mlflow.db"
    shutil.copy(db, finished.root / "before.db")
    kept = {
        p: p.stat().st_mtime_ns
        for p in results.rglob("*")
        if p.is_file() and not {"mlartifacts", "logs", "benchmarks"} & set(p.parts)
    }
    db.unlink()
    dry = finished.run("-n")
    assert re.search(
        r"adaptune: MLflow at sqlite:///results/mlflow.db has no database file .*"
        r"mlflow.db \(deleted\?\): the workflow brings it up to date when it runs "
        r"\(3 run\(s\) of results/faults to log again",
        dry.stderr,
    ), dry.stderr
    assert "Nothing to be done" in dry.stdout + dry.stderr
    assert not db.exists()  # a dry run changes nothing
    result = finished.run("--cores", "2")
    output = result.stdout + result.stderr
    assert "holds every finished run of results/faults again (3 logged from their files" in output
    assert "Nothing to be done" in output  # nothing retrained or evaluated again
    changed = [p for p, mtime in kept.items() if p.stat().st_mtime_ns != mtime]
    assert sorted(p.name for p in changed) == ["mlflow_experiment.json"] + ["mlflow_run_id"] * 3

    uri, before = f"sqlite:///{db}", f"sqlite:///{finished.root / 'before.db'}"
    now, then = store_runs(uri, "faults"), store_runs(before, "faults")
    assert {key: run.info.run_id for key, run in now.items()} == file_run_ids(results)
    assert set(now) == set(then) == {"full/k2/seed0", "full/k2/seed1", "tfidf_logreg/k2"}
    new, old = MlflowClient(uri), MlflowClient(before)
    only_in_mlflow = {"train_loss_step", "lr", "grad_norm"}  # per step: in no file
    for key, run in now.items():
        was = then[key]
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.LOGGED_TAG] == ("baseline" if "tfidf" in key else "evaluate")
        assert run.data.params == was.data.params, key
        lost = {m for m in was.data.metrics if m.startswith("system/")} | only_in_mlflow
        assert set(run.data.metrics) == set(was.data.metrics) - lost, key
        assert all(
            run.data.metrics[m] == pytest.approx(was.data.metrics[m]) for m in run.data.metrics
        )
        for metric in ("val_macro_f1", "train_loss"):
            if metric in was.data.metrics:
                history = [m.value for m in new.get_metric_history(run.info.run_id, metric)]
                assert history == [m.value for m in old.get_metric_history(was.info.run_id, metric)]
        assert artifact_paths(new, run.info.run_id) == artifact_paths(old, was.info.run_id)
        assert len(run.inputs.dataset_inputs) == len(was.inputs.dataset_inputs)
        tags = {k for k in set(run.data.tags) ^ set(was.data.tags) if not k.startswith("mlflow.")}
        assert tags == {tracking.REBUILT_TAG}
        assert abs(run.info.start_time - was.info.start_time) < 60_000  # when its files were
    models = new.search_logged_models([new.get_experiment_by_name("faults").experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(
        now[k].info.run_id for k in now if "tfidf" not in k
    )
    best = pd.read_csv(results / "report/best_per_shots.csv").loc[0]
    selected = f"{best['model_strategy']}/k2/seed{best['model_seed']}"
    assert (
        new.get_model_version_by_alias("faults-k2", "champion").run_id == now[selected].info.run_id
    )
    assert finished.dry_run_jobs() == {}
    quiet = finished.run("-n")
    assert "adaptune: MLflow" not in quiet.stderr  # in step now


@pytest.mark.workflow
def test_a_new_tracking_uri_retrains_nothing_and_sync_mlflow_repairs_by_hand(finished):
    """Pointing mlflow.tracking_uri at another store retrains nothing and logs every run there;
    a lost mlflow_experiment.json stops the workflow, naming the command that recreates it,
    and that command works."""
    results = finished.results("faults")
    config = finished.config
    config["mlflow"]["tracking_uri"] = "sqlite:///results/other.db"
    finished.write_config(config)
    dry = finished.run("-n")
    assert (
        "adaptune: MLflow at sqlite:///results/other.db is not the store the runs were logged "
        "to, sqlite:///results/mlflow.db (experiment 'faults')" in dry.stderr
    ), dry.stderr
    # A new tracking URI retrains nothing (the report, whose params are the whole config,
    # registers the champion there again).
    for stage in ("prepare_data", "score_importance", "finetune", "evaluate"):
        assert f"rule {stage}:" not in dry.stdout, dry.stdout[-2000:]
    assert "rule report:" in dry.stdout  # (the dry run lists jobs as "rule NAME:")
    finished.run("--cores", "2")
    other = f"sqlite:///{finished.root / 'results/other.db'}"
    ids = file_run_ids(results)
    assert {key: run.info.run_id for key, run in store_runs(other, "faults").items()} == ids
    assert tracking.read_experiment(results / "mlflow_experiment.json")["tracking_uri"] == (
        "sqlite:///results/other.db"
    )

    (results / "mlflow_experiment.json").unlink()
    (finished.root / "results/other.db").unlink()
    stopped = finished.run("-n", "--configfile", "config/config.yaml", check=False)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0
    assert (
        "results/faults/mlflow_experiment.json is missing, but 3 finished run(s) in results/faults "
        "log into MLflow through it: snakemake would train them all again. Recreate it, "
        "without retraining: adaptune sync-mlflow config/config.yaml" in output
    ), output[-2000:]
    command = [sys.executable, "-m", "adaptune.cli", "sync-mlflow", "config/config.yaml"]
    synced = subprocess.run(command, cwd=finished.root, capture_output=True, text=True)
    assert synced.returncode == 0, synced.stderr[-2000:]
    for key in ids:
        assert f"{key}: logged again from its files as run" in synced.stdout
    assert "registered model faults-k2: version 1 is @champion" in synced.stdout
    assert finished.dry_run_jobs() == {}
    # (read without MLflow: this process's client still holds the deleted file open)
    with sqlite3.connect(finished.root / "results/other.db") as db:
        live = db.execute(
            "select t.value, r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'adaptune.key' and r.lifecycle_stage = 'active'"
        ).fetchall()
    assert dict(live) == file_run_ids(results) and len(live) == 3


@pytest.mark.workflow
def test_a_run_whose_settings_predate_the_job_record_is_logged_again(
    finished, tmp_path, monkeypatch
):
    """A run trained before settings.json held its job and tags (it held run, train, model and
    plan): logged again, it has its own params, per-epoch curves, test metrics, model and
    files, and lacks only what those sections never said (the data and importance settings,
    the datasets, the plan and importance tables). Done in a copy of the results."""
    from mlflow.tracking import MlflowClient

    from adaptune import records

    shutil.copytree(finished.results("faults"), tmp_path / "results/faults", symlinks=True)
    monkeypatch.chdir(tmp_path)
    results = Path("results/faults")
    settings = results / "runs/full/k2/seed1/settings.json"
    record = json.loads(settings.read_text())
    assert {"job", "tags"} <= set(record)
    settings.write_text(json.dumps({k: record[k] for k in ("run", "train", "model", "plan")}))
    uri = f"sqlite:///{tmp_path / 'legacy.db'}"
    done = records.sync(uri, "faults", results / "mlartifacts", results)
    assert sorted(done["relogged"]) == ["full/k2/seed0", "full/k2/seed1", "tfidf_logreg/k2"]
    runs = store_runs(uri, "faults")
    client = MlflowClient(uri)
    current, legacy = runs["full/k2/seed0"], runs["full/k2/seed1"]
    for run, folder in ((current, "seed0"), (legacy, "seed1")):
        metrics = json.loads((results / f"runs/full/k2/{folder}/metrics.json").read_text())
        assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["test_macro_f1"])
        assert run.data.tags[tracking.LOGGED_TAG] == "evaluate"
        epochs = len(pd.read_csv(results / f"runs/full/k2/{folder}/history.csv"))
        assert len(client.get_metric_history(run.info.run_id, "val_macro_f1")) == epochs
        assert run.data.params["trainable_params"] == str(
            json.loads((results / f"runs/full/k2/{folder}/train_summary.json").read_text())[
                "trainable_params"
            ]
        )
    never_said = set(current.data.params) - set(legacy.data.params)
    assert set(legacy.data.params) < set(current.data.params)
    assert all(p.startswith(("data.", "importance.")) for p in never_said), never_said
    assert len(current.inputs.dataset_inputs) == 2 and not legacy.inputs.dataset_inputs
    files = artifact_paths(client, current.info.run_id)
    tables = {p for p in files if p.startswith("importance/") or p == "full.json"}
    assert tables and artifact_paths(client, legacy.info.run_id) == files - tables
    assert legacy.data.tags["strategy"] == "full" and legacy.data.tags["seed"] == "1"
