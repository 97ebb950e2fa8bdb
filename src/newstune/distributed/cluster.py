"""Ray, the optional engine for scaling out: imported lazily, joined or started quietly, with one-line errors."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from newstune.errors import NewstuneError

INSTALL_HINT = "pip install 'newstune[ray]'"
# What the workers need from the driver's environment (a remote cluster does not inherit it).
FORWARDED_ENV = ("NEWSTUNE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_PARALLELISM")


def require_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise NewstuneError(f"--engine ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init retries an unreachable address for minutes; a plain TCP connect says so in seconds."""
    host_port = address.removeprefix("ray://")
    if address == "auto" or ":" not in host_port:
        return
    host, port = host_port.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise NewstuneError(f"cannot reach a Ray cluster at --address {address} ({reason}); start one there with "
                            "`ray start --head`, fix the address, or drop --address to use a local Ray") from None


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                log_to_driver: bool = False) -> Iterator[ModuleType]:
    """Joins the cluster at `address`, or starts a local Ray (no dashboard, quiet logs); shut down afterwards
    unless it was already running in this process. log_to_driver shows the workers' output (training's bar)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        check_reachable(address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(include_dashboard=False, num_cpus=num_cpus) if not address else {}
    try:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING, configure_logging=True,
                 runtime_env={"env_vars": forwarded_env()}, **kwargs)
    except ConnectionError as err:
        raise NewstuneError(f"cannot join the Ray cluster at --address {address}: {str(err).splitlines()[0]}; "
                            "check that `ray status` works there") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray: ModuleType) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def check_workers(ray: ModuleType, workers: int, cpus_each: int = 1) -> None:
    available = cluster_cpus(ray)
    if workers < 1 or workers * cpus_each > available:
        raise NewstuneError(f"--workers {workers} needs {workers * cpus_each} CPUs but the Ray cluster has "
                            f"{available}; give --workers {max(1, available // cpus_each)} or fewer")


def root_cause(err: BaseException) -> str:
    """The message of a NewstuneError raised inside a worker, else the last line of what Ray reports."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "NewstuneError:" in line:
            return line.split("NewstuneError:", 1)[1].strip()
    return lines[-1] if lines else type(err).__name__

