"""Data: from a file or a named dataset to token batches.

Owns reading CSV/TSV/JSONL and the shared local copies (`files`, `registry`), cleaning and textualising rows
(`text`, `speaker_record` for LIAR's record), splitting and class weights (`splits`), augmentation (`augment`), and
tokenizing into length-grouped batches (`batching`). It knows nothing of models or runs.
May import: `newstune.config`, `newstune.errors` (and `newstune.paths` for the cache folder).
"""
