"""Training: from a recipe to a finished run folder.

Owns the loop (`train.Trainer`, which only trains) and the post-training steps `train.train` composes after it
(`steps`: baseline, calibration, plots, card, latency), checkpoints and resume (`checkpoint`), distillation from a
teacher run (`distill`), seed groups (`seeds`), sweeps and searches (`sweep`, `search`), recalibrating a finished run
(`calibrate`) and the step profiler (`profile`).
May import: every package above it (`data`, `modeling`, `decisions`, `rundir`, `reporting`, `distributed`).
"""
