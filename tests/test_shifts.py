"""Shifted test splits: each shift is a function of its seed and the example alone, changes what
it says it changes, and is prepared again exactly as the test split was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from adaptune import modalities
from adaptune.data_info import DataInfo
from adaptune.errors import ConfigError
from adaptune.experiment import check_shifts
from adaptune.modalities.image.shifts import SHIFTS as IMAGE_SHIFTS
from adaptune.modalities.shifts import example_rng, parse_shift_name, perturbed, shift_name
from adaptune.modalities.text.shifts import SHIFTS as TEXT_SHIFTS
from adaptune.settings import DataSettings, ModelSettings

TEXTS = pd.Series(
    [
        "Shares in the bank rose sharply on Monday after strong results.",
        "The striker scored twice as United won the league title again.",
        "Ministers will publish the new election plans later this week.",
    ]
)
IDS = pd.Series([11, 42, 7])


def digit_image() -> np.ndarray:
    """A real 8x8 digit (scikit-learn's), upscaled (bilinear) to 96 px RGB as the model sees
    it."""
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = Image.fromarray((load_digits().images[3] / 16 * 255).astype(np.uint8))
    large = np.asarray(pixels.resize((96, 96), Image.Resampling.BILINEAR))
    return np.repeat(large[..., None], 3, axis=2)


@pytest.mark.parametrize("kind", sorted(TEXT_SHIFTS))
def test_a_text_shift_is_the_same_for_its_seed_and_differs_for_another(kind):
    shift = TEXT_SHIFTS[kind]
    first = perturbed(TEXTS, IDS, shift, 5, seed=0)
    assert first == perturbed(TEXTS, IDS, shift, 5, seed=0)
    assert first != perturbed(TEXTS, IDS, shift, 5, seed=1)
    assert first != TEXTS.tolist()
    # Each example's draw depends on its id, not on its row: reordering changes nothing.
    reordered = perturbed(TEXTS[::-1], IDS[::-1], shift, 5, seed=0)
    assert reordered[::-1] == first


def test_text_shifts_change_what_they_say_and_more_with_severity():
    text = " ".join(TEXTS) * 20
    words = text.split()
    rng = lambda sev: example_rng(0, "x", sev, 1)  # noqa: E731
    dropped = [len(TEXT_SHIFTS["word_dropout"].apply(text, s, rng(s)).split()) for s in (1, 5)]
    assert len(words) > dropped[0] > dropped[1]  # 5% then 40% of the words gone
    swapped = TEXT_SHIFTS["word_swap"].apply(text, 3, rng(3)).split()
    assert sorted(swapped) == sorted(words) and swapped != words
    typo = TEXT_SHIFTS["typos"].apply(text, 3, rng(3)).split()
    assert len(typo) == len(words)  # a typo changes a word, never the number of words
    changed = sum(a != b for a, b in zip(typo, words, strict=True)) / len(words)
    assert 0.1 < changed < 0.3  # severity 3: a fifth of the words
    cased = TEXT_SHIFTS["casing"].apply(text, 5, rng(5))
    assert cased.lower() == text.lower() and cased != text


@pytest.mark.parametrize("kind", sorted(IMAGE_SHIFTS))
def test_an_image_corruption_is_deterministic_keeps_the_shape_and_grows_with_severity(kind):
    image = digit_image()
    shift = IMAGE_SHIFTS[kind]
    mild = shift.apply(image, 1, example_rng(0, kind, 1, 3))
    again = shift.apply(image, 1, example_rng(0, kind, 1, 3))
    strong = shift.apply(image, 5, example_rng(0, kind, 5, 3))
    assert mild.shape == strong.shape == image.shape and mild.dtype == np.uint8
    assert np.array_equal(mild, again)
    distance = [np.abs(x.astype(float) - image).mean() for x in (mild, strong)]
    assert 0 < distance[0] < distance[1]


def test_shift_names_round_trip():
    assert shift_name("gaussian_blur", 3) == "gaussian_blur-s3"
    assert parse_shift_name("gaussian_blur-s3") == ("gaussian_blur", 3)


def test_a_shift_of_the_other_modality_is_a_config_error():
    with pytest.raises(ConfigError, match=r"evaluate.shifts.gaussian_blur: not a shift of text"):
        check_shifts(modalities.get("text"), {"gaussian_blur": [3]})
    check_shifts(modalities.get("image"), {"gaussian_blur": [3]})


def test_a_shifted_text_split_is_tokenised_as_the_test_split_was(tiny_bert_dir):
    from adaptune.modalities.text import models, tokenize

    modality = modalities.get("text")
    model = ModelSettings.from_config({"name": f"path:{tiny_bert_dir}"})
    data = DataSettings.from_config({"source": "bundled:bbc-news", "max_length": 16})
    tokenizer = models.load_tokenizer(model.name)
    test = tokenize(
        pd.DataFrame({"example_id": IDS, "text": TEXTS, "label_id": [0, 1, 2]}), tokenizer, 16
    )
    shifted = modality.shift(test, "word_dropout", 5, 0, data, model)
    assert shifted["label_id"].tolist() == [0, 1, 2]
    assert shifted["text"].tolist() == perturbed(TEXTS, IDS, TEXT_SHIFTS["word_dropout"], 5, 0)
    expected = tokenize(shifted[["example_id", "text", "label_id"]], tokenizer, 16)
    for got, want in zip(shifted["input_ids"], expected["input_ids"], strict=True):
        assert np.array_equal(got, want)
    assert all(len(ids) <= 16 for ids in shifted["input_ids"])


def test_a_shifted_image_split_is_corrupted_at_the_models_resize_size(tiny_vision_dir):
    from adaptune.modalities.image.transforms import ImageTransform

    transform = ImageTransform((32, 32), 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    image = digit_image()[:90, :96]  # not square: the shorter side becomes 36
    test = pd.DataFrame(
        {
            "example_id": [5],
            "image": [image.tobytes()],
            "height": [90],
            "width": [96],
            "label_id": [3],
        }
    )
    info = DataInfo.for_labels("image", [str(i) for i in range(10)], transform=transform.to_dict())
    modality = modalities.for_data(info)
    shifted = modality.shift(test, "gaussian_noise", 2, 0, None, None)
    assert (shifted["height"].item(), shifted["width"].item()) == (36, 38)
    assert shifted["label_id"].item() == 3
    again = modality.shift(test, "gaussian_noise", 2, 0, None, None)
    assert shifted["image"].item() == again["image"].item()
    other = modality.shift(test, "gaussian_noise", 2, 1, None, None)
    assert shifted["image"].item() != other["image"].item()
