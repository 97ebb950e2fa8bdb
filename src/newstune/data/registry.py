"""Dataset registry: every loader returns a DatasetBundle with train/validation/test splits."""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from newstune.config import DataConfig
from newstune.data.text import LIAR_CREDIT_FIELDS, LIAR_FIELD_TITLES, clean_text, textualize_liar
from newstune.errors import NewstuneError

SPLITS = ("train", "validation", "test")


@dataclass
class TextSplit:
    texts: list[str]
    labels: list[int]
    origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.origins:
            self.origins = ["original"] * len(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextSplit:
        return TextSplit([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                         [self.origins[i] for i in indices])


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


def data_dir(config: DataConfig) -> Path | None:
    if config.dir is not None:
        if not config.dir.is_dir():
            raise NewstuneError(f"data.dir {config.dir} is not a folder; point it at the dataset's files")
        return config.dir
    root = os.environ.get("NEWSTUNE_DATA")
    if root and (Path(root) / config.name).is_dir():
        return Path(root) / config.name
    return None


def find_file(folder: Path, candidates: list[str], what: str) -> Path:
    for name in candidates:
        for path in (folder / name, folder / f"{name}.gz"):
            if path.is_file():
                return path
    raise NewstuneError(f"no {what} file in {folder} (looked for {', '.join(candidates)}, optionally .gz)")


def read_table(path: Path, **kwargs) -> pd.DataFrame:
    """CSV/TSV/JSONL (maybe gzipped) with every field as a string and no NaN conversion."""
    if not path.is_file():
        raise NewstuneError(f"file not found: {path} (check the path in the config)")
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ".csv"
    try:
        if kind in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=True, dtype=False, **kwargs)
            return frame.astype(str) if len(frame) else frame
        sep = "\t" if kind == ".tsv" else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, **kwargs)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise NewstuneError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None


def stratified_split(split: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """Hold out `fraction` of every class (at least one row where a class has two or more)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(split.labels):
        by_class.setdefault(label, []).append(index)
    kept, held = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        n_held = round(len(indices) * fraction) if len(indices) > 1 else 0
        n_held = max(n_held, 1) if len(indices) > 1 else 0
        held += indices[:n_held]
        kept += indices[n_held:]
    return split.subset(sorted(kept)), split.subset(sorted(held))


def encode_labels(values: list[str], label_names: list[str], where: str) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise NewstuneError(
            f"{where}: unknown label value(s) {unknown[:5]}; known labels are {label_names} "
            "(fix the data or set data.label_names)"
        )
    return [index[v] for v in values]


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
    unknown = sorted(set(config.metadata_fields) - set(LIAR_FIELD_TITLES))
    if unknown:
        raise NewstuneError(f"data.metadata_fields: unknown field(s) {unknown}; choose from {list(LIAR_FIELD_TITLES)}")
    if config.credit_history:
        warnings.warn("data.credit_history: the LIAR credit counts include the statement's own label "
                      "(label leakage); this run is marked leaky in metrics.json", stacklevel=2)
    rows = {}
    for split, name in (("train", "train.tsv"), ("validation", "valid.tsv"), ("test", "test.tsv")):
        frame = read_liar(find_file(folder, [name], f"LIAR {split}"))
        records = frame.to_dict("records")
        labels = [r["label"] for r in records]
        if config.labels == "binary":
            labels = [LIAR_BINARY.get(label, label) for label in labels]
        rows[split] = [(textualize_liar(r, config.metadata_fields, config.credit_history), label)
                       for r, label in zip(records, labels)]
    return rows, (["fake", "true"] if config.labels == "binary" else list(LIAR_SIX))


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
    """(line number, text, label) for every row of a user file, with a clear error for a bad column."""
    frame = read_table(path)
    needed = [*config.text_columns, config.label_column]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise NewstuneError(f"{path}: no column(s) {missing}; columns are {list(frame.columns)} "
                            "(set data.text_columns / data.label_column)")
    line_offset = 1 if path.suffixes and ".jsonl" in path.suffixes else 2
    for number, record in enumerate(frame[needed].to_dict("records"), start=line_offset):
        yield number, build_text(record, config), str(record[config.label_column])


def build_text(record: dict[str, str], config: DataConfig) -> str:
    if config.text_template:
        try:
            return config.text_template.format(**record)
        except KeyError as err:
            raise NewstuneError(f"data.text_template names {err} which is not in data.text_columns") from None
    return " ".join(str(record[c]).strip() for c in config.text_columns)


def load_files(config: DataConfig, folder: Path | None) -> tuple[dict[str, list[tuple[str, str]]], None]:
    def resolve(path: Path) -> Path:
        return path if path.is_absolute() or folder is None else folder / path

    rows = {}
    for split, path in (("train", config.train_file), ("validation", config.valid_file),
                        ("test", config.test_file)):
        if path is not None:
            rows[split] = [(text, label) for _, text, label in iter_file_rows(resolve(path), config)]
    return rows, None


LOADERS: dict[str, Callable] = {"ag_news": load_ag_news, "liar": load_liar, "huffpost": load_huffpost,
                                "files": load_files}


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
    for split, hub_split in split_names.items():
        if hub_split not in hub:
            continue
        part = hub[hub_split]
        names = part.features["label"].names if "label" in part.features else None
        if config.name == "ag_news":
            rows[split] = [(r["text"], AG_NEWS_CLASSES[r["label"]]) for r in part]
        elif config.name == "liar":
            records = [{HUB_LIAR_COLUMNS.get(k, k): str(v) for k, v in r.items()} for r in part]
            labels = [names[int(r["label"])] for r in records]
            if config.labels == "binary":
                labels = [LIAR_BINARY[label] for label in labels]
            rows[split] = [(textualize_liar(r, config.metadata_fields, config.credit_history), label)
                           for r, label in zip(records, labels)]
        else:
            rows[split] = [(f"{r['headline'].strip()}. {r['short_description'].strip()}",
                            HUFFPOST_MERGES.get(r["category"], r["category"]) if config.merge_categories
                            else r["category"]) for r in part]
    label_names = {"ag_news": list(AG_NEWS_CLASSES), "huffpost": None,
                   "liar": ["fake", "true"] if config.labels == "binary" else list(LIAR_SIX)}[config.name]
    return rows, label_names


# ---------------------------------------------------------------- assembly


def check_texts(rows: list[tuple[str, str]], split: str, drop_empty: bool) -> list[tuple[str, str]]:
    empty = [i for i, (text, _) in enumerate(rows) if not text.strip()]
    if empty and not drop_empty:
        raise NewstuneError(f"{split}: {len(empty)} empty text(s), first at data row {empty[0] + 1} "
                            "(fix the data or set data.drop_empty: true)")
    return [row for row in rows if row[0].strip()]


def load_rows(config: DataConfig) -> tuple[dict[str, list[tuple[str, str]]], list[str] | None]:
    """Cleaned (text, label name) rows per split as the source has them, before any label encoding."""
    folder = data_dir(config)
    if folder is None and config.name != "files":
        raw_rows, label_names = hub_rows(config)
    else:
        raw_rows, label_names = LOADERS[config.name](config, folder)
    raw_rows = {split: [(clean_text(t, config.clean), label) for t, label in rows] for split, rows in raw_rows.items()}
    return {split: check_texts(rows, split, config.drop_empty) for split, rows in raw_rows.items()}, label_names


def load_dataset(config: DataConfig, seed: int = 42) -> DatasetBundle:
    raw_rows, label_names = load_rows(config)
    label_names = config.label_names or label_names or sorted({label for _, label in raw_rows["train"]})
    if config.min_class_count:
        counts = Counter(label for _, label in raw_rows["train"])
        label_names = [name for name in label_names if counts[name] >= config.min_class_count]
        raw_rows = {s: [r for r in rows if r[1] in label_names] for s, rows in raw_rows.items()}
    splits = {split: TextSplit([t for t, _ in rows], encode_labels([lab for _, lab in rows], label_names, split))
              for split, rows in raw_rows.items()}
    splits = fill_missing_splits(splits, config, seed)
    splits = limit_rows(splits, config, seed)
    if config.augment.eda or config.augment.synthetic_file:
        from newstune.data.augment import augment_train

        splits["train"] = augment_train(splits, label_names, config.augment, seed)
    info = {"dataset": config.name, "rows": {s: len(v) for s, v in splits.items()}}
    if config.name == "liar" and config.credit_history:
        info["leaky"] = True
    return DatasetBundle(splits=splits, label_names=list(label_names), info=info)


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
    if "test" not in splits:
        splits["train"], splits["test"] = stratified_split(splits["train"], config.test_fraction, seed)
    if "validation" not in splits:
        splits["train"], splits["validation"] = stratified_split(splits["train"], config.valid_fraction, seed + 1)
    return {split: splits[split] for split in SPLITS}


def limit_rows(splits: dict[str, TextSplit], config: DataConfig, seed: int) -> dict[str, TextSplit]:
    def cut(split: TextSplit, limit: int | None) -> TextSplit:
        if limit is None or limit >= len(split):
            return split
        _, kept = stratified_split(split, limit / len(split), seed + 2)
        return kept

    return {"train": cut(splits["train"], config.max_train_rows),
            "validation": cut(splits["validation"], config.max_eval_rows),
            "test": cut(splits["test"], config.max_eval_rows)}


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
