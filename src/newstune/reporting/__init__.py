"""Reporting: what a run or a group of runs tells its reader.

Owns scoring saved runs on a split and comparing them (`report`), the model card (`card`) and the mean ± spread of a
seed group (`seed_table`). It reads runs through `newstune.rundir` and trains nothing.
May import: the leaves, `data`, `modeling`, `decisions`, `rundir`.
"""
