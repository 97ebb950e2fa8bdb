"""`newstune sweep --engine ray`: each trial's training runs as a Ray task somewhere on the cluster, while the driver
keeps the Optuna study (several trials at once through optuna's n_jobs). A task that fails or dies is a failed
training: optuna's retry callback re-queues it, Ray does not retry it behind optuna's back (max_retries=0)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from newstune.distributed.cluster import check_workers, cluster_cpus, ray_session

TrainFn = Callable[[Path, list[str], Path, Path], bool]  # (recipe, overrides, run dir, log file) -> trained


def _train_in_folder(train: TrainFn, cwd: str, recipe: Path, overrides: list[str], run_dir: Path,
                     log_path: Path) -> bool:
    os.chdir(cwd)
    return train(recipe, overrides, run_dir, log_path)


@contextmanager
def ray_trials(current_train: Callable[[], TrainFn], address: str | None, workers: int | None,
               cpus_per_trial: int) -> Iterator[tuple[TrainFn, int]]:
    """(a trainer that runs each call as a Ray task, how many trials to run at once)."""
    with ray_session(address) as ray:
        task = ray.remote(num_cpus=cpus_per_trial, max_retries=0)(_train_in_folder)
        cwd = os.getcwd()

        def train(recipe: Path, overrides: list[str], run_dir: Path, log_path: Path) -> bool:
            try:
                return ray.get(task.remote(current_train(), cwd, recipe.resolve(), overrides, run_dir.resolve(),
                                           log_path.resolve()))
            except ray.exceptions.RayError as err:  # the task's worker or node died, or the task raised
                run_dir.mkdir(parents=True, exist_ok=True)
                reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                (run_dir / "FAILED").write_text(f"Ray task failed: {reason[:280]}\n")
                return False

        workers = workers or max(1, cluster_cpus(ray) // cpus_per_trial)
        check_workers(ray, workers, cpus_per_trial)
        yield train, workers
