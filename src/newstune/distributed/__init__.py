"""Distributed: the Ray plumbing shared by training, sweeps and prediction.

Owns starting or joining a Ray cluster and checking it has the workers asked for (`cluster`), and running sweep
trials as Ray tasks (`sweep`). The jobs themselves stay with their concern: `newstune.training.ray_train` trains a run
under Ray Train, `newstune.inference.ray_predict` scores a file with Ray Data, both through these helpers.
May import: the leaves, `data`, `modeling`, `decisions`, `rundir`, `reporting`.
"""
