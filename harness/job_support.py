"""Small pieces shared by the Ray Tune jobs (head sweeps, DenseNet baselines): strict YAML sections, trial
resources, timing, hashing and atomic JSON writes, and starting or joining a Ray cluster.

Job files are parsed with the strictness of ``harness.config``: a YAML section becomes a frozen dataclass, an
unknown key or an ill-typed value is a :class:`~harness.config.ConfigError` naming the key. Ray is imported only
inside :func:`init_ray` and :func:`ray_run_config`, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.config import ConfigError, build_dataclass, to_dict

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Strict YAML -> dataclass.
# ---------------------------------------------------------------------------------------------------------


def load_job_yaml(path: str | os.PathLike, cls: type) -> Any:
    """Read a job YAML file into dataclass ``cls``; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    try:
        return build_dataclass(cls, tree or {}, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def job_to_dict(spec: Any) -> dict[str, Any]:
    """A job dataclass as plain YAML/JSON values (tuples as lists)."""
    return to_dict(spec)


# ---------------------------------------------------------------------------------------------------------
# Resources, timing, files.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for: CPU cores and a GPU share (0.25 = four trials share one device)."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if self.cpu <= 0:
            raise ConfigError(f"resources.cpu: must be > 0, got {self.cpu}")
        if self.gpu < 0 or (self.gpu > 1 and not float(self.gpu).is_integer()):
            raise ConfigError(f"resources.gpu: a fraction in [0, 1] or a whole number of devices, got {self.gpu}")

    def as_ray(self) -> dict[str, float]:
        """The dict ``tune.with_resources`` takes."""
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True)
class Splits:
    """Split names: fit on ``train``, select on ``val``, report ``test`` once."""

    train: str = "train"
    val: str = "val"
    test: str = "test"


class Stopwatch:
    """Wall-clock and process CPU seconds (all threads) since construction."""

    def __init__(self) -> None:
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall_start

    def cpu(self) -> float:
        return time.process_time() - self.cpu_start


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (identifies a latents table or a manifest in run records)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as strict, indented JSON (NaN/inf become null) through a temporary file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_finite(data), handle, indent=2, default=_json_default, allow_nan=False)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _finite(value: Any) -> Any:
    """A copy with NaN/inf floats as None, so the file is strict JSON."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _finite(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------------------------------------------------
# Ray.
# ---------------------------------------------------------------------------------------------------------


def init_ray(num_cpus: int | None = None) -> bool:
    """Start a local Ray with ``num_cpus`` cores (default: all), or join the cluster named by ``RAY_ADDRESS``.

    ``ray job submit`` sets ``RAY_ADDRESS`` for the driver, so the same command line runs locally and on a
    cluster; a cluster's size is its own, so ``num_cpus`` is ignored there. Returns True when this call
    started Ray (the caller then shuts it down), False when Ray was already running in this process.
    """
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None:
            log.warning("RAY_ADDRESS=%s is set: joining that cluster, --num-cpus %s is ignored",
                        os.environ["RAY_ADDRESS"], num_cpus)
        ray.init()
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


def ray_run_config(name: str, storage: str | os.PathLike, **kwargs: Any) -> Any:
    """A quiet ``tune.RunConfig`` whose results go to ``storage`` (a local folder, or a shared/cloud URI)."""
    from ray import tune

    storage = str(storage)
    if "://" not in storage:  # Ray needs an absolute local path
        storage = str(Path(storage).resolve())
    return tune.RunConfig(name=name, storage_path=storage, verbose=0, **kwargs)
