"""Dataset registry: every loader returns a DatasetBundle with train/validation/test splits."""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from newstune.config import DataConfig
from newstune.data.augment import augment_train
from newstune.data.files import read_table, require_columns
from newstune.data.speaker_record import LEAKY_MODES, LIAR_CREDIT_FIELDS, with_speaker_records
from newstune.data.splits import TextSplit, encode_label_sets, encode_labels, split_label_set, stratified_split
from newstune.data.text import LIAR_FIELD_TITLES, clean_text, textualize_liar
from newstune.errors import NewstuneError

SPLITS = ("train", "validation", "test")
HOLDOUT = "holdout"
HOLDOUT_SEED = 20261204  # fixed: the holdout slice must be the same rows for every seed, run and search


@dataclass
class DatasetBundle:
    splits: dict[str, TextSplit]
    label_names: list[str]
    info: dict = field(default_factory=dict)


LIAR_COLUMNS = ["id", "label", "statement", "subject", "speaker", "job", "state", "party",
                *LIAR_CREDIT_FIELDS, "context"]
LIAR_SIX = ["pants-fire", "false", "barely-true", "half-true", "mostly-true", "true"]
LIAR_BINARY = {"pants-fire": "fake", "false": "fake", "barely-true": "fake",
               "half-true": "true", "mostly-true": "true", "true": "true"}
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
# Categories that HuffPost renamed over the years; merging them gives one class per topic.
HUFFPOST_MERGES = {
    "THE WORLDPOST": "WORLD NEWS", "WORLDPOST": "WORLD NEWS", "PARENTS": "PARENTING",
    "ARTS & CULTURE": "CULTURE & ARTS", "ARTS": "CULTURE & ARTS", "STYLE": "STYLE & BEAUTY",
    "HEALTHY LIVING": "WELLNESS", "TASTE": "FOOD & DRINK", "GREEN": "ENVIRONMENT",
    "COLLEGE": "EDUCATION", "MONEY": "BUSINESS",
}
HF_HUB_IDS = {"ag_news": "fancyzhx/ag_news", "liar": "ucsbnlp/liar", "huffpost": "heegyu/news-category-dataset"}
DATA_FOLDERS = {"liar_subjects": "liar"}  # datasets read from another dataset's files


def is_multi_label(config: DataConfig) -> bool:
    return config.multi_label or config.name == "liar_subjects"


def liar_fields(config: DataConfig) -> list[str]:
    """The LIAR metadata written into the text; liar_subjects leaves out the subjects, which are its labels."""
    return [f for f in config.metadata_fields if not (config.name == "liar_subjects" and f == "subject")]


def data_dir(config: DataConfig) -> Path | None:
    if config.dir is not None:
        if not config.dir.is_dir():
            raise NewstuneError(f"data.dir {config.dir} is not a folder; point it at the dataset's files")
        return config.dir
    root = os.environ.get("NEWSTUNE_DATA")
    folder = DATA_FOLDERS.get(config.name, config.name)
    if root and (Path(root) / folder).is_dir():
        return Path(root) / folder
    return None


def find_file(folder: Path, candidates: list[str], what: str) -> Path:
    for name in candidates:
        for path in (folder / name, folder / f"{name}.gz"):
            if path.is_file():
                return path
    raise NewstuneError(f"no {what} file in {folder} (looked for {', '.join(candidates)}, optionally .gz)")


# ---------------------------------------------------------------- loaders


def load_ag_news(config: DataConfig, folder: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    def read(path: Path) -> list[tuple[str, str]]:
        with_header = read_table(path, nrows=1)
        if "text" in with_header.columns and "class_index" in with_header.columns:
            frame = read_table(path)
            return list(zip(frame["text"], frame["class_index"]))
        frame = read_table(path, header=None)
        if frame.shape[1] != 3:
            raise NewstuneError(f"{path}: expected 3 columns (class, title, description), got {frame.shape[1]}")
        return list(zip(frame[1] + " " + frame[2], frame[0]))

    train = read(find_file(folder, ["train.csv", "train_partial_text.csv", "train_partial.csv"], "AG News train"))
    test = read(find_file(folder, ["test.csv"], "AG News test"))
    to_name = {str(i + 1): name for i, name in enumerate(AG_NEWS_CLASSES)}
    to_name.update({name: name for name in AG_NEWS_CLASSES})

    def named(rows: list[tuple[str, str]], split: str) -> list[tuple[str, str]]:
        bad = {label for _, label in rows if label not in to_name}
        if bad:
            raise NewstuneError(f"AG News {split}: unknown class index {sorted(bad)[:5]} (expected 1-4)")
        return [(text, to_name[label]) for text, label in rows]

    return {"train": named(train, "train"), "test": named(test, "test")}, list(AG_NEWS_CLASSES)


def read_liar(path: Path) -> pd.DataFrame:
    # LIAR has unbalanced quotes inside statements: quoting must be off or rows merge.
    frame = read_table(path, header=None, quoting=csv.QUOTE_NONE, names=LIAR_COLUMNS)
    return frame


def load_liar(config: DataConfig, folder: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    records = {split: read_liar(find_file(folder, [name], f"LIAR {split}")).to_dict("records")
               for split, name in (("train", "train.tsv"), ("validation", "valid.tsv"), ("test", "test.tsv"))}
    return liar_rows(records, config), (["fake", "true"] if config.labels == "binary" else list(LIAR_SIX))


def check_liar_fields(config: DataConfig) -> None:
    unknown = sorted(set(config.metadata_fields) - set(LIAR_FIELD_TITLES))
    if unknown:
        raise NewstuneError(f"data.metadata_fields: unknown field(s) {unknown}; choose from {list(LIAR_FIELD_TITLES)}")
    if config.credit_history in LEAKY_MODES:
        warnings.warn(f"data.credit_history: {config.credit_history}: the speaker's record carries the statement's "
                      "own label (label leakage); this run is marked leaky in metrics.json. Use train_record for "
                      "a leak-free record", stacklevel=3)


def liar_rows(records: dict[str, list[dict]], config: DataConfig) -> dict[str, list[tuple[str, str]]]:
    """(text, label) per split from LIAR rows whose 'label' is the six-way rating."""
    check_liar_fields(config)
    records = with_speaker_records(records, config.credit_history)
    with_history = config.credit_history != "off"
    rows = {}
    for split, split_records in records.items():
        labels = [r["label"] for r in split_records]
        if config.labels == "binary":
            labels = [LIAR_BINARY.get(label, label) for label in labels]
        rows[split] = [(textualize_liar(r, config.metadata_fields, with_history), label)
                       for r, label in zip(split_records, labels)]
    return rows


def load_liar_subjects(config: DataConfig, folder: Path) -> tuple[dict[str, list[tuple[str, tuple]]], None]:
    """LIAR statements (with the chosen metadata but never the subjects) labelled with their subjects."""
    rows = {}
    for split, name in (("train", "train.tsv"), ("validation", "valid.tsv"), ("test", "test.tsv")):
        records = read_liar(find_file(folder, [name], f"LIAR {split}")).to_dict("records")
        rows[split] = [(textualize_liar(r, liar_fields(config), False), split_label_set(r["subject"], ","))
                       for r in records]
    return rows, None


def load_huffpost(config: DataConfig, folder: Path) -> tuple[dict[str, list[tuple[str, str]]], None]:
    path = find_file(folder, ["News_Category_Dataset_v3.json", "News_Category_Dataset_v3.head10000.jsonl",
                              "News_Category_Dataset_v2.json", "huffpost.jsonl"], "HuffPost")
    frame = read_table(path)
    missing = {"headline", "short_description", "category"} - set(frame.columns)
    if missing:
        raise NewstuneError(f"{path}: missing column(s) {sorted(missing)}; expected the News Category JSON Lines")
    categories = frame["category"].tolist()
    if config.merge_categories:
        categories = [HUFFPOST_MERGES.get(c, c) for c in categories]
    texts = (frame["headline"].str.strip() + ". " + frame["short_description"].str.strip()).tolist()
    return {"train": list(zip(texts, categories))}, None


def iter_file_rows(path: Path, config: DataConfig) -> Iterator[tuple[int, str, str]]:
    """(line number, text, label) for every row of a user file; a bad file or column is one error naming the line."""
    frame = read_table(path)
    needed = [*config.text_columns, config.label_column]
    require_columns(path, frame, needed)
    for number, record in zip(frame.index, frame[needed].to_dict("records")):
        yield int(number), build_text(record, config), str(record[config.label_column])


def input_columns(config: DataConfig) -> list[str]:
    """The columns a row needs to be classified by a run trained on `config` (LIAR: the statement; its metadata
    columns are used when present, as training used them)."""
    if config.name == "liar_subjects":
        return ["statement"]
    if config.name == "liar":
        return ["statement", *(LIAR_CREDIT_FIELDS if config.credit_history != "off" else [])]
    return list(config.text_columns)


def optional_input_columns(config: DataConfig) -> list[str]:
    """Columns training wrote into the text that a row to classify may leave out (LIAR's metadata)."""
    return liar_fields(config) if config.name in ("liar", "liar_subjects") else []


def record_input_text(record: dict, config: DataConfig) -> str:
    """A prediction row's text, uncleaned; a missing column or a bad value is a NewstuneError naming it."""
    missing = [c for c in input_columns(config) if c not in record or record[c] is None]
    if missing:
        raise NewstuneError(f"missing column(s) {missing}")
    return record_text({k: str(v) for k, v in record.items()}, config)


def record_text(record: dict[str, str], config: DataConfig) -> str:
    """A row's text built the way training built it, before cleaning: one path for train and predict."""
    if config.name in ("liar", "liar_subjects"):
        # The counts given are the speaker's prior record as it stands: no mode rewrites them at prediction.
        row = {column: str(record.get(column) or "") for column in LIAR_COLUMNS}
        return textualize_liar(row, liar_fields(config), config.credit_history != "off" and config.name == "liar")
    return build_text(record, config)


def build_text(record: dict[str, str], config: DataConfig) -> str:
    if config.text_template:
        try:
            return config.text_template.format(**record)
        except KeyError as err:
            raise NewstuneError(f"data.text_template names {err} which is not in data.text_columns") from None
    return " ".join(str(record[c]).strip() for c in config.text_columns)


def resolve_file(config: DataConfig, path: Path) -> Path:
    """A data.*_file path, relative to the data folder unless absolute."""
    folder = data_dir(config)
    return path if path.is_absolute() or folder is None else folder / path


def load_files(config: DataConfig, folder: Path | None) -> tuple[dict[str, list[tuple[str, str]]], None]:
    rows = {}
    for split, path in (("train", config.train_file), ("validation", config.valid_file),
                        ("test", config.test_file)):
        if path is not None:
            rows[split] = [(text, label) for _, text, label in iter_file_rows(resolve_file(config, path), config)]
    return rows, None


LOADERS: dict[str, Callable] = {"ag_news": load_ag_news, "liar": load_liar, "huffpost": load_huffpost,
                                "files": load_files, "liar_subjects": load_liar_subjects}


HUB_LIAR_COLUMNS = {"job_title": "job", "state_info": "state", "party_affiliation": "party",
                    "barely_true_counts": "barely_true_count", "false_counts": "false_count",
                    "half_true_counts": "half_true_count", "mostly_true_counts": "mostly_true_count",
                    "pants_on_fire_counts": "pants_fire_count"}


def hub_rows(config: DataConfig) -> tuple[dict[str, list[tuple[str, str]]], list[str] | None]:
    """The same rows as the local loaders, from the Hugging Face hub (needs internet)."""
    hub_id = HF_HUB_IDS[config.name]
    try:
        import datasets

        hub = datasets.load_dataset(hub_id)
    except Exception as err:  # noqa: BLE001 -- any hub failure becomes one actionable line
        raise NewstuneError(
            f"dataset '{config.name}': no local copy (set data.dir, --data-dir or NEWSTUNE_DATA) and the "
            f"Hugging Face hub load of '{hub_id}' failed: {str(err).splitlines()[0][:160]}"
        ) from None
    split_names = {"train": "train", "validation": "validation", "test": "test"}
    rows: dict[str, list[tuple[str, str]]] = {}
    liar_records: dict[str, list[dict]] = {}
    for split, hub_split in split_names.items():
        if hub_split not in hub:
            continue
        part = hub[hub_split]
        names = part.features["label"].names if "label" in part.features else None
        if config.name == "ag_news":
            rows[split] = [(r["text"], AG_NEWS_CLASSES[r["label"]]) for r in part]
        elif config.name == "liar":
            records = [{HUB_LIAR_COLUMNS.get(k, k): str(v) for k, v in r.items()} for r in part]
            liar_records[split] = [{**r, "label": names[int(r["label"])]} for r in records]
        else:
            rows[split] = [(f"{r['headline'].strip()}. {r['short_description'].strip()}",
                            HUFFPOST_MERGES.get(r["category"], r["category"]) if config.merge_categories
                            else r["category"]) for r in part]
    if liar_records:
        rows = liar_rows(liar_records, config)
    label_names = {"ag_news": list(AG_NEWS_CLASSES), "huffpost": None,
                   "liar": ["fake", "true"] if config.labels == "binary" else list(LIAR_SIX)}[config.name]
    return rows, label_names


# ---------------------------------------------------------------- assembly


def source_of(config: DataConfig, split: str) -> str:
    """Where a split's rows come from, for error messages: the file (files loader) or the dataset's split."""
    path = {"train": config.train_file, "validation": config.valid_file, "test": config.test_file}[split]
    if config.name == "files" and path is not None:
        return str(resolve_file(config, path))
    return f"{config.name} {split} split"


def check_texts(rows: list[tuple[str, str]], split: str, drop_empty: bool) -> list[tuple[str, str]]:
    empty = [i for i, (text, _) in enumerate(rows) if not text.strip()]
    if empty and not drop_empty:
        raise NewstuneError(f"{split}: {len(empty)} empty text(s), first at data row {empty[0] + 1} "
                            "(fix the data or set data.drop_empty: true)")
    kept = [row for row in rows if row[0].strip()]
    if rows and not kept:
        raise NewstuneError(f"{split}: every text is empty after cleaning; fix the data or data.text_columns")
    return kept


def load_rows(config: DataConfig) -> tuple[dict[str, list[tuple[str, str]]], list[str] | None]:
    """Cleaned (text, label name) rows per split as the source has them, before any label encoding."""
    folder = data_dir(config)
    if folder is None and config.name == "liar_subjects":
        raise NewstuneError("liar_subjects reads the LIAR TSVs from a local folder: set data.dir, --data-dir or "
                            "NEWSTUNE_DATA (with a liar/ folder)")
    if folder is None and config.name != "files":
        raw_rows, label_names = hub_rows(config)
    else:
        raw_rows, label_names = LOADERS[config.name](config, folder)
    raw_rows = {split: [(clean_text(t, config.clean), label) for t, label in rows] for split, rows in raw_rows.items()}
    return {split: check_texts(rows, split, config.drop_empty) for split, rows in raw_rows.items()}, label_names


def check_classes(rows: list[tuple[str, str]], config: DataConfig) -> None:
    """Training rows of two or more classes: one class would train to a meaningless accuracy of 1.0."""
    classes = sorted({label for _, label in rows})
    if len(classes) >= 2:
        return
    kept = f" kept by data.min_class_count={config.min_class_count}" if config.min_class_count else ""
    found = f"every training row{kept} has the label {classes[0]!r}" if classes else f"no training rows{kept}"
    raise NewstuneError(f"{source_of(config, 'train')}: {found}; a classifier needs two or more classes, "
                        f"so add rows of other classes{' or lower data.min_class_count' if kept else ''}")


def load_dataset(config: DataConfig, seed: int = 42) -> DatasetBundle:
    raw_rows, label_names = load_rows(config)
    if is_multi_label(config):
        splits, label_names, extra_info = multi_label_splits(raw_rows, config)
    else:
        splits, label_names, extra_info = single_label_splits(raw_rows, label_names, config)
    splits = fill_missing_splits(splits, config, seed)
    splits = limit_rows(splits, config, seed)
    if config.augment.eda or config.augment.synthetic_file:
        splits["train"] = augment_train(splits, label_names, config.augment, seed)
    info = {"dataset": config.name, "rows": {s: len(v) for s, v in splits.items()}, **extra_info}
    if config.name == "liar" and config.credit_history in LEAKY_MODES:
        info["leaky"] = True
    return DatasetBundle(splits=splits, label_names=list(label_names), info=info)


def single_label_splits(raw_rows: dict[str, list[tuple[str, str]]], label_names: list[str] | None,
                        config: DataConfig) -> tuple[dict[str, TextSplit], list[str], dict]:
    label_names = config.label_names or label_names or sorted({label for _, label in raw_rows["train"]})
    if config.min_class_count:
        counts = Counter(label for _, label in raw_rows["train"])
        label_names = [name for name in label_names if counts[name] >= config.min_class_count]
        raw_rows = {s: [r for r in rows if r[1] in label_names] for s, rows in raw_rows.items()}
    check_classes(raw_rows["train"], config)
    splits = {split: TextSplit([t for t, _ in rows], encode_labels([lab for _, lab in rows], label_names, split))
              for split, rows in raw_rows.items()}
    return splits, label_names, {}


def multi_label_splits(raw_rows: dict[str, list[tuple[str, str | tuple]]],
                       config: DataConfig) -> tuple[dict[str, TextSplit], list[str], dict]:
    """Label cells split into sets and encoded as multi-hot rows; with data.top_labels only the N most frequent
    training labels are kept and rows left without a label are left out (counted in the info)."""
    sets = {split: [(text, split_label_set(cell, config.label_separator)) for text, cell in rows]
            for split, rows in raw_rows.items()}
    counts = Counter(name for _, names in sets["train"] for name in names)
    if config.label_names:
        label_names = list(config.label_names)
    elif config.top_labels:
        label_names = [name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:config.top_labels]]
    else:
        label_names = sorted(counts)
    left_out = {}
    if config.top_labels:
        keep = set(label_names)
        for split, rows in sets.items():
            kept = [(text, tuple(n for n in names if n in keep)) for text, names in rows]
            sets[split] = [row for row in kept if row[1]]
            left_out[split] = len(kept) - len(sets[split])
    if len(label_names) < 2:
        raise NewstuneError(f"{source_of(config, 'train')}: multi-label data needs two or more labels, found "
                            f"{label_names}; check data.label_column and data.label_separator")
    splits = {split: TextSplit([t for t, _ in rows],
                               encode_label_sets([n for _, n in rows], label_names, source_of(config, split)))
              for split, rows in sets.items()}
    return splits, label_names, {"multi_label": True, "rows_without_kept_labels": left_out}


def load_eval_set(data: DataConfig, label_map: dict[str, str] | None, label_names: list[str]) -> TextSplit:
    """Every row of another labelled source, its labels mapped onto a run's labels (unmapped rows left out)."""
    raw_rows, _ = load_rows(data)
    rows = [row for split in raw_rows.values() for row in split]
    if label_map is not None:
        rows = [(text, label_map[label]) for text, label in rows if label in label_map]
    if not rows:
        raise NewstuneError(f"extra evaluation set from '{data.name}' has no rows after the label mapping")
    return TextSplit([t for t, _ in rows], encode_labels([lab for _, lab in rows], label_names, "extra eval"))


def fill_missing_splits(splits: dict[str, TextSplit], config: DataConfig, seed: int) -> dict[str, TextSplit]:
    holdout = {}
    if config.holdout_fraction:  # first, so that the slice does not depend on the seed's validation split
        splits["train"], holdout[HOLDOUT] = stratified_split(splits["train"], config.holdout_fraction, HOLDOUT_SEED)
    if "test" not in splits:
        splits["train"], splits["test"] = stratified_split(splits["train"], config.test_fraction, seed)
    if "validation" not in splits:
        splits["train"], splits["validation"] = stratified_split(splits["train"], config.valid_fraction, seed + 1)
    return {**{split: splits[split] for split in SPLITS}, **holdout}


def limit_rows(splits: dict[str, TextSplit], config: DataConfig, seed: int) -> dict[str, TextSplit]:
    def cut(split: TextSplit, limit: int | None) -> TextSplit:
        if limit is None or limit >= len(split):
            return split
        _, kept = stratified_split(split, limit / len(split), seed + 2)
        return kept

    return {"train": cut(splits["train"], config.max_train_rows),
            "validation": cut(splits["validation"], config.max_eval_rows),
            "test": cut(splits["test"], config.max_eval_rows),
            **({HOLDOUT: cut(splits[HOLDOUT], config.max_eval_rows)} if HOLDOUT in splits else {})}

