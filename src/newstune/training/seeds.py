"""One recipe trained over several seeds, summarised as the mean and spread of every figure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from newstune.config import RunConfig, dump_config, validate
from newstune.errors import Interrupted, NewstuneError
from newstune.reporting.seed_table import group_runs, summarize
from newstune.rundir.run import (
    GROUP_FILE,
    METRICS_FILE,
    check_new_run_dir,
    is_seed_group,
    planned_run_dir,
    seed_run_dir,
    write_atomically,
)
from newstune.training.train import CHECKPOINT, resume, train

SUMMARY_FILE = "seeds.json"


def train_seeds(config: RunConfig, seeds: int, output_dir: Path | None = None) -> tuple[Path, dict]:
    """Trains the recipe with seeds train.seed, train.seed + 1, ... into GROUP/seed-N/; returns GROUP, summary."""
    if seeds < 2:
        raise NewstuneError(f"--seeds {seeds}: a spread needs at least 2 seeds; use plain `newstune train` for one")
    group = planned_run_dir(config, output_dir)
    check_new_run_dir(group)
    group.mkdir(parents=True)
    seed_list = [config.train.seed + i for i in range(seeds)]
    (group / GROUP_FILE).write_text(yaml.safe_dump({"seeds": seed_list, "recipe": yaml.safe_load(dump_config(config))},
                                                   sort_keys=False))
    return group, finish_seeds(group)


def train_or_resume(config: RunConfig | None, seeds: int, output_dir: Path | None,
                    resume_dir: Path | None) -> tuple[Path, dict]:
    """`train --seeds N` (a new group) or `train --resume GROUP` (finish one)."""
    if resume_dir is None:
        return train_seeds(config, seeds, output_dir)
    if not is_seed_group(resume_dir):
        raise NewstuneError(f"{resume_dir} is not a seed group (no {GROUP_FILE}); resume a single run without --seeds")
    planned = yaml.safe_load((resume_dir / GROUP_FILE).read_text())["seeds"]
    if seeds not in (1, len(planned)):
        raise NewstuneError(f"{resume_dir} was started with {len(planned)} seeds; drop --seeds to finish it")
    return resume_dir, finish_seeds(resume_dir)


def finish_seeds(group: Path) -> dict:
    spec = yaml.safe_load((group / GROUP_FILE).read_text())
    for seed in spec["seeds"]:
        run_dir = seed_run_dir(group, seed)
        if (run_dir / METRICS_FILE).is_file():
            continue
        try:
            if (run_dir / CHECKPOINT).is_file():
                resume(run_dir)
                continue
            if run_dir.exists():  # stopped before its first checkpoint: kept aside, never deleted
                run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
            config = validate(spec["recipe"], str(group / GROUP_FILE))
            config.train.seed = seed
            train(config, run_dir)
        except Interrupted:
            raise Interrupted(f"interrupted in {run_dir.name}; continue the group with: newstune train --resume "
                              f"{group}") from None
    summary = summarize(group_runs(group))
    write_atomically(group / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary
