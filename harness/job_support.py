"""Small pieces shared by the Ray Tune jobs (head sweeps, DenseNet baselines): strict YAML sections, trial
resources, timing, hashing and atomic JSON writes, and starting or joining a Ray cluster.

Job files are parsed with the strictness of ``harness.config``: a YAML section becomes a frozen dataclass, an
unknown key or an ill-typed value is a :class:`~harness.config.ConfigError` naming the key. Ray is imported only
inside :func:`init_ray` and :func:`ray_run_config`, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.config import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Strict YAML -> dataclass.
# ---------------------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to ``annotation`` (lists become tuples), or ConfigError naming ``key``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else build_dataclass(annotation, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(_coerce(item, a, f"{key}[{i}]") for i, (item, a) in enumerate(zip(value, args, strict=True)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a YAML mapping; unknown keys, bad types and failed checks name ``where``."""
    label = where or "top level"
    if not isinstance(values, dict):
        raise ConfigError(f"{label}: expected a mapping of {cls.__name__} fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; valid keys: {known}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{label}: {error}") from None


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
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(spec))


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
