"""`newstune train --engine ray`: the same Accelerate training loop, data-parallel under Ray Train's TorchTrainer.

Ray Train starts one worker per process, sets up torch.distributed (gloo on CPU, NCCL on GPUs) and the RANK /
WORLD_SIZE / MASTER_ADDR variables that Accelerate reads, so `train.train` runs unchanged in every worker, exactly as
under `accelerate launch`: rank 0 creates the run directory and writes the metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from newstune.config import RunConfig
from newstune.errors import NewstuneError
from newstune.ray_cluster import ray_session
from newstune.run import check_new_run_dir, planned_run_dir, read_config


def _worker_loop(loop: dict) -> None:
    """What each Ray Train worker runs: newstune's own training, from the driver's folder."""
    import ray.train

    from newstune import train as training

    os.chdir(loop["cwd"])  # relative paths in the recipe (data.dir, output_dir) mean what they meant to the user
    if loop["resume"]:
        run_dir, metrics = training.resume(Path(loop["run_dir"]), loop["stop_after_steps"])
    else:
        run_dir, metrics = training.train(loop["config"], Path(loop["run_dir"]), loop["stop_after_steps"])
    ray.train.report({"run_dir": str(run_dir), "metrics": json.dumps(metrics)})


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
        result = _fit(ray, loop, workers, cpus_per_worker, run_dir)
    return Path(result["run_dir"]), json.loads(result["metrics"])


def _fit(ray, loop: dict, workers: int, cpus_per_worker: int, run_dir: Path) -> dict:
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
        return trainer.fit().metrics
    except ray.train.TrainingFailedError as err:
        raise NewstuneError(f"training on Ray failed: {_root_cause(err)}") from None
    except KeyboardInterrupt:
        raise NewstuneError(f"interrupted; continue from the last checkpoint with: newstune train --resume {run_dir} "
                            "--engine ray") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def _root_cause(err: BaseException) -> str:
    """The first line of what failed inside a worker (a NewstuneError keeps its own message)."""
    text = str(err)
    for line in text.splitlines():
        if "NewstuneError:" in line:
            return line.split("NewstuneError:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
