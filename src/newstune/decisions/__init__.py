"""Decisions: from logits to labels, and how good they are.

Owns the decision rule a run ships (`rule`: temperature, thresholds, top-k), the metrics and plots of a split
(`metrics`), fitting the rule on validation (`tuning`, `calibration`), the TF-IDF linear baseline every run is
compared with (`baseline`) and the hybrid that blends it with the encoder (`ensemble`). Nothing here knows about
run folders or training loops. May import: `newstune.config`, `newstune.errors`, `newstune.data`.
"""
