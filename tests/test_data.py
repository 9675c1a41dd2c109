import numpy as np
import pandas as pd
import pytest
import torch

from adaptune.data import check_labels, prepare, sample_few_shot, split_examples
from adaptune.data_info import DataInfo
from adaptune.errors import DataError
from adaptune.modalities.text import MODALITY as TEXT
from adaptune.modalities.text.sources import load_bbc_news
from adaptune.settings import DataSettings, ModelSettings


def data(source: str, **values) -> DataSettings:
    return DataSettings.from_config({"source": source, **values})


@pytest.fixture(scope="module")
def bbc() -> pd.DataFrame:
    return check_labels(load_bbc_news(), "bbc")


def test_bbc_news_is_the_whole_corpus(bbc):
    assert len(bbc) == 2225
    assert bbc["label"].value_counts().to_dict() == {
        "sports": 511,
        "business": 510,
        "politics": 417,
        "tech": 401,
        "entertainment": 386,
    }
    assert bbc["text"].str.len().min() > 100


def test_split_is_stratified_disjoint_and_deterministic(bbc):
    splits = split_examples(bbc, 0.1, 0.2, seed=0)
    ids = [set(part["example_id"]) for part in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == len(bbc)
    overall = bbc["label"].value_counts(normalize=True)
    for part in splits.values():
        share = part["label"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.01
    again = split_examples(bbc, 0.1, 0.2, seed=0)
    assert all(splits[s]["example_id"].tolist() == again[s]["example_id"].tolist() for s in splits)
    other = split_examples(bbc, 0.1, 0.2, seed=1)
    assert splits["test"]["example_id"].tolist() != other["test"]["example_id"].tolist()


def test_few_shot_is_k_per_class_and_nested(bbc):
    train = split_examples(bbc, 0.1, 0.2, seed=0)["train"]
    four, sixteen = sample_few_shot(train, 4, 0), sample_few_shot(train, 16, 0)
    assert four["label"].value_counts().eq(4).all() and len(four) == 20
    assert sixteen["label"].value_counts().eq(16).all()
    assert set(four["example_id"]) <= set(sixteen["example_id"])
    assert sample_few_shot(train, None, 0) is train
    assert set(sample_few_shot(train, 4, 1)["example_id"]) != set(four["example_id"])


def test_more_shots_than_examples_names_the_classes():
    train = pd.DataFrame({"example_id": range(5), "text": ["t"] * 5, "label": list("aaabb")})
    with pytest.raises(DataError, match=r"3 shots per class asked.*\{'b': 2\}"):
        sample_few_shot(train, 3, 0)


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": ["a", "b"], "topic": ["x", "y"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no column\(s\) \['text', 'label'\].*\['body', 'topic'\]"):
        TEXT.load_examples(data(f"csv:{path}"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"no file at .*nope.csv"):
        TEXT.load_examples(data(f"csv:{tmp_path / 'nope.csv'}"))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"text": ["a", "b"], "label": ["x", "x"]}), "only one class"),
        (pd.DataFrame({"text": ["a", "b"], "label": ["x", None]}), "have no label"),
        (pd.DataFrame({"text": [], "label": []}), "no examples"),
    ],
)
def test_bad_labels_are_refused(frame, message):
    with pytest.raises(DataError, match=message):
        check_labels(frame, "src")


def test_empty_texts_are_refused(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", " ", "c"], "label": ["x", "y", "x"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"empty text \(rows \[1\]\)"):
        TEXT.load_examples(data(f"csv:{path}"))


def test_tiny_classes_cannot_be_split():
    frame = check_labels(pd.DataFrame({"text": list("abcdefg"), "label": list("xxxxxyy")}), "s")
    with pytest.raises(DataError, match=r"fewer than 3 examples"):
        split_examples(frame, 0.2, 0.2, 0)


def test_fingerprint_follows_content(bbc):
    assert TEXT.fingerprint(bbc) == TEXT.fingerprint(bbc.copy())
    changed = bbc.copy()
    changed.loc[0, "text"] += "!"
    assert TEXT.fingerprint(changed) != TEXT.fingerprint(bbc)


def test_prepare_csv_with_other_columns_and_labels(bbc_sample_csv, tiny_bert_dir):
    settings = data(
        f"csv:{bbc_sample_csv}", text_column="body", label_column="topic", max_length=16
    )
    splits, info = prepare(settings, ModelSettings.from_config(f"path:{tiny_bert_dir}"))
    assert info.modality == "text" and info.encoding["max_length"] == 16
    assert info.labels == ("business", "entertainment", "politics", "sports", "tech")
    # 120 articles, one of them twice (BBC News repeats 98 of its 2,225 articles): one copy kept.
    assert info.duplicates["duplicate_copies"] == 1
    assert sum(sum(c.values()) for c in info.class_counts.values()) == 119
    assert DataInfo.from_dict(info.to_dict()) == info  # data.json holds all of it
    assert all(len(ids) <= 16 for ids in splits["train"]["input_ids"])
    assert splits["train"]["label_id"].between(0, 4).all()


def test_batches_are_padded_per_batch():
    frame = pd.DataFrame(
        {"input_ids": [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])], "label_id": [0, 1, 0]}
    )
    text = TEXT.bind(DataInfo.for_labels("text", ["a", "b"], pad_token_id=0))
    batch = next(text.batches(frame, 2))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    shuffled = list(
        text.batches(frame, 3, shuffle=True, generator=torch.Generator().manual_seed(0))
    )
    assert sorted(shuffled[0]["labels"].tolist()) == [0, 0, 1]
