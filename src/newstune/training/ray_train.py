"""`newstune train --engine ray`: the same Accelerate training loop, data-parallel under Ray Train's TorchTrainer.

Ray Train starts one worker per process, sets up torch.distributed (gloo on CPU, NCCL on GPUs) and the RANK /
WORLD_SIZE / MASTER_ADDR variables that Accelerate reads, so `train.train` runs unchanged in every worker, exactly as
under `accelerate launch`: rank 0 creates the run directory and writes the metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from newstune.config import RunConfig
from newstune.distributed.cluster import check_workers, ray_session, root_cause
from newstune.errors import Interrupted, NewstuneError
from newstune.rundir.run import check_new_run_dir, planned_run_dir, read_config, read_metrics


def _worker_loop(loop: dict) -> None:
    """What each Ray Train worker runs: newstune's own training, from the driver's folder. Rank 0 writes the run
    folder, which the driver reads (Ray Train keeps reported metrics only with Ray checkpoints)."""
    from newstune.training import train as training

    os.chdir(loop["cwd"])  # relative paths in the recipe (data.dir, output_dir) mean what they meant to the user
    if loop["resume"]:
        training.resume(Path(loop["run_dir"]), loop["stop_after_steps"])
    else:
        training.train(loop["config"], Path(loop["run_dir"]), loop["stop_after_steps"])


def train_on_ray(config: RunConfig | None, output_dir: Path | None = None, stop_after_steps: int | None = None,
                 workers: int = 2, address: str | None = None, resume: Path | None = None,
                 cpus_per_worker: int = 1) -> tuple[Path, dict]:
    """A new run (or `resume` of one) trained by `workers` Ray Train workers; returns its directory and metrics."""
    if workers < 1:
        raise NewstuneError(f"--workers {workers}: give at least 1")
    if resume is not None:
        config, run_dir = read_config(resume), Path(resume).resolve()
    else:
        run_dir = planned_run_dir(config, output_dir).resolve()
        check_new_run_dir(run_dir)  # before any cluster starts; rank 0 creates it
    loop = {"config": config, "run_dir": str(run_dir), "resume": resume is not None,
            "stop_after_steps": stop_after_steps, "cwd": os.getcwd()}
    with ray_session(address, log_to_driver=True) as ray:
        _fit(ray, loop, workers, cpus_per_worker, run_dir)
    return run_dir, read_metrics(run_dir)


def _fit(ray, loop: dict, workers: int, cpus_per_worker: int, run_dir: Path) -> None:
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_workers(ray, workers, cpus_per_worker)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Ray Train keeps its own bookkeeping in storage_path; newstune's checkpoints live in the run folder.
    storage = tempfile.mkdtemp(prefix=".ray-train-", dir=run_dir.parent)
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(name=run_dir.name, storage_path=storage))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise NewstuneError(f"training on Ray failed: {root_cause(err)}") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; continue from the last checkpoint with: newstune train --resume {run_dir} "
                          "--engine ray") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)

