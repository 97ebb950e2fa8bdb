"""Inference: using a finished run on new texts.

Owns batch prediction on files (`predict`, and `ray_predict` on a Ray cluster), exporting a run to OpenVINO / ONNX
with an accuracy gate (`export`, `backend_export`), and generating synthetic training rows filtered by a run
(`generate`). May import: every package but `newstune.cli`.
"""
