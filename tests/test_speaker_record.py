import re
import warnings
from collections import Counter, defaultdict

import numpy as np
import pytest

from newstune.config import DataConfig
from newstune.data.registry import load_dataset, record_text
from newstune.data.speaker_record import (
    FOLDS,
    LIAR_CREDIT_FIELDS,
    credit_count,
    fold_of,
    record_numbers,
    with_speaker_records,
)
from newstune.errors import NewstuneError

from .conftest import SHARED_DATA, needs_shared_data

COUNTS = {"barely_true_count": 1, "false_count": 2, "half_true_count": 3, "mostly_true_count": 4,
          "pants_fire_count": 5}


def row(id_: int, label: str, speaker: str = "jane-doe", **counts) -> dict:
    return {"id": f"{id_}.json", "label": label, "statement": f"claim {id_}", "speaker": speaker,
            **COUNTS, **counts}


def test_exclude_self_takes_off_the_statements_own_rating_only():
    rows = {"train": [row(1, "false"), row(2, "pants-fire"), row(3, "true")]}
    out = with_speaker_records(rows, "exclude_self")["train"]
    assert out[0]["false_count"] == 1 and out[0]["pants_fire_count"] == 5
    assert out[1]["pants_fire_count"] == 4 and out[1]["false_count"] == 2
    assert {k: out[2][k] for k in COUNTS} == COUNTS, "'true' has no count column to take from"


def test_training_record_never_reads_the_rows_own_label():
    train = [row(i, "false" if i % 2 else "half-true") for i in range(40)]
    flipped = [dict(r) for r in train]
    flipped[0]["label"] = "pants-fire"
    test = [row(1000, "false")]
    before = with_speaker_records({"train": train, "test": test}, "train_record")
    after = with_speaker_records({"train": flipped, "test": test}, "train_record")
    own_fold = [r for r in train if fold_of(r) == fold_of(train[0])]
    assert {k: before["train"][0][k] for k in COUNTS} == {k: after["train"][0][k] for k in COUNTS}
    assert before["train"][0]["false_count"] == sum(1 for r in train if r["label"] == "false") - sum(
        1 for r in own_fold if r["label"] == "false"), "a training row sees the other folds' ratings"
    assert before["test"][0]["false_count"] == 20 and before["test"][0]["half_true_count"] == 20
    assert before["test"][0]["pants_fire_count"] == 0, "the file's own counts are replaced, not added to"
    assert len({fold_of(r) for r in train}) == FOLDS


def test_other_speakers_do_not_mix():
    rows = {"train": [row(1, "false", "a"), row(2, "false", "b")], "test": [row(3, "true", "a")]}
    assert with_speaker_records(rows, "train_record")["test"][0]["false_count"] == 1


def test_prediction_takes_the_given_counts_as_they_stand():
    config = DataConfig(name="liar", credit_history="train_record", metadata_fields=["speaker"])
    text = record_text({"statement": "Taxes went up.", "speaker": "jane-doe", **{k: str(v) for k, v in COUNTS.items()}},
                       config)
    assert text == ("Taxes went up. Speaker: jane doe. History (15 rated): barely true 1 (7%), false 2 (13%), "
                    "half true 3 (20%), mostly true 4 (27%), pants fire 5 (33%).")


@pytest.mark.parametrize("bad", ["-1", "2.5", "many", "NaN", "inf", "1e999"])
def test_a_bad_count_is_one_clear_error(bad):
    with pytest.raises(NewstuneError, match="false_count .* is not a whole number >= 0"):
        credit_count(bad, "false_count")


def test_old_boolean_recipes_still_mean_off_and_raw():
    assert DataConfig(name="liar", credit_history=False).credit_history == "off"
    assert DataConfig(name="liar", credit_history=True).credit_history == "raw"


def lookup_accuracy(bundle) -> tuple[int, float]:
    """Test rows whose (speaker, history text) also occurs in train, and how often the train label there is right."""
    def keys(split):
        part = bundle.splits[split]
        speakers = [re.search(r"Speaker: ([^.]*)\.", text) for text in part.texts]
        return [(m.group(1) if m else "", text[text.index("History"):]) for m, text in zip(speakers, part.texts)]

    seen = defaultdict(Counter)
    for key, label in zip(keys("train"), bundle.splits["train"].labels):
        seen[key][label] += 1
    hits = [(seen[key].most_common(1)[0][0], label) for key, label in zip(keys("test"), bundle.splits["test"].labels)
            if key in seen]
    return len(hits), sum(guess == label for guess, label in hits) / max(len(hits), 1)


def history_by_speaker(bundle, split: str) -> dict[str, set[str]]:
    found = defaultdict(set)
    for text in bundle.splits[split].texts:
        speaker = re.search(r"Speaker: ([^.]*)\.", text)
        if speaker:
            found[speaker.group(1)].add(text[text.index("History"):])
    return found


@needs_shared_data()
def test_only_the_training_record_is_leak_free_on_liar():
    bundles = {}
    for mode in ("exclude_self", "train_record"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundles[mode] = load_dataset(DataConfig(name="liar", dir=SHARED_DATA / "liar", credit_history=mode))
    hits, accuracy = lookup_accuracy(bundles["exclude_self"])
    assert hits > 800 and accuracy > 0.99, "exclude_self: a recurring speaker's record spells out the label"
    assert bundles["exclude_self"].info["leaky"] is True
    for split in ("validation", "test"):
        records = history_by_speaker(bundles["train_record"], split)
        assert all(len(texts) == 1 for texts in records.values()), "one record per speaker, whatever the label"
        assert any(len(texts) > 1 for texts in history_by_speaker(bundles["exclude_self"], split).values())
    assert "leaky" not in bundles["train_record"].info
    assert all(field.removesuffix("_count").replace("_", " ") in bundles["train_record"].splits["test"].texts[0]
               for field in LIAR_CREDIT_FIELDS)


def test_record_numbers_are_shares_in_field_order_and_the_log_total():
    numbers = record_numbers([row(1, "false"), row(2, "true", **dict.fromkeys(COUNTS, "0"))])
    np.testing.assert_allclose(numbers[0], [1 / 15, 2 / 15, 3 / 15, 4 / 15, 5 / 15, np.log(16)])
    np.testing.assert_allclose(numbers[1], [0, 0, 0, 0, 0, 0])  # no record: no shares, not a division by zero
    with pytest.raises(NewstuneError, match="false_count"):
        record_numbers([row(3, "false", false_count="2.5")])
