"""Small pieces shared by the Ray Tune jobs (head sweeps, DenseNet baselines): loading a job file, trial
resources, timing, hashing and atomic JSON writes, and starting or joining a Ray cluster.

Job files are read by the one loader of ``harness.config`` (:func:`harness.config.load_yaml`): a job type is a
frozen pydantic dataclass, an unknown key or an ill-typed value is a :class:`~harness.config.ConfigError` naming
every bad key. Ray is imported only inside :func:`init_ray` and :func:`ray_run_config`, so importing this module
stays cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from harness.config import load_yaml, to_dict
from harness.config.errors import ConfigError, require
from harness.config.fields import SECTION, Float, Name
from harness.fileio import sha256_file
from harness.fileio import write_json_atomic as fileio_write_json_atomic

log = logging.getLogger(__name__)


def job_to_dict(spec: Any) -> dict[str, Any]:
    """A job dataclass as plain YAML/JSON values (tuples as lists)."""
    return to_dict(spec)


# ---------------------------------------------------------------------------------------------------------
# Resources, timing, files.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, config=SECTION)
class Resources:
    """What one trial asks Ray for: CPU cores and a GPU share (0.25 = four trials share one device)."""

    cpu: Annotated[Float, Field(gt=0)] = 1.0
    gpu: Annotated[Float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _check(self) -> Resources:
        require([] if self.gpu <= 1 or float(self.gpu).is_integer() else
                [("gpu", f"a fraction in [0, 1] or a whole number of devices, got {self.gpu}")])
        return self

    def as_ray(self) -> dict[str, float]:
        """The dict ``tune.with_resources`` takes."""
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True, config=SECTION)
class Splits:
    """Split names: fit on ``train``, select on ``val``, report ``test`` once."""

    train: Name = "train"
    val: Name = "val"
    test: Name = "test"


class Stopwatch:
    """Wall-clock and process CPU seconds (all threads) since construction."""

    def __init__(self) -> None:
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall_start

    def cpu(self) -> float:
        return time.process_time() - self.cpu_start


# One implementation of each, shared by every writer (harness.fileio); the names stay for the job scripts.
file_sha256 = sha256_file
write_json_atomic = fileio_write_json_atomic


# ---------------------------------------------------------------------------------------------------------
# Ray.
# ---------------------------------------------------------------------------------------------------------


def load_job(path: str | os.PathLike, cls: type, tracking_uri: str | None = None) -> Any:
    """A job file as ``cls`` (:func:`harness.config.load_yaml`), its MLflow store replaced by ``tracking_uri``."""
    job = load_yaml(path, cls, what="job file")
    if tracking_uri:
        job = dataclasses.replace(job, track=dataclasses.replace(job.track, tracking_uri=tracking_uri))
    return job


def publish_summary(out: Path, tracker: Any, report: Any, summary: dict[str, Any]) -> Path:
    """A job's ``summary.json`` (written atomically) and its HTML report, both logged to the job's MLflow run."""
    path = write_json_atomic(out / "summary.json", summary)
    tracker.log_artifact(path)
    tracker.log_artifacts(Path(report.write()).parent, "report")
    return path


def job_from_args(args: Any, cls: type) -> Any:
    """The command-line start of a job: INFO logging, then ``args.config`` loaded as ``cls`` (:func:`load_job`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return load_job(args.config, cls, args.tracking_uri)


@contextmanager
def ray_job(tracker: Any, num_cpus: int | None = None, address: str | None = None) -> Iterator[None]:
    """Run a block with Ray started (or joined, :func:`init_ray`) and the tracker's run open: on leaving, the run
    ends FINISHED (FAILED on any exception) and Ray is shut down if this call started it."""
    try:
        started = init_ray(num_cpus, address)
    except BaseException:
        tracker.end("FAILED")
        raise
    try:
        yield
        tracker.end()
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()


CLUSTER_ANSWER_S = 5.0  # how long a cluster address may take to accept a connection before it is refused


def check_cluster_address(address: str, timeout_s: float = CLUSTER_ANSWER_S) -> str:
    """``host:port`` of a Ray head (its GCS port, ``ray start --head --port``) that accepts a TCP connection
    within ``timeout_s``; a :class:`ConfigError` (one line) otherwise, so a wrong address fails in seconds
    instead of Ray's own long wait. ``ray://`` and ``auto`` addresses are handed to Ray unchecked."""
    if address == "auto" or "://" in address:
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"error: Ray cluster address {address!r} is not host:port; give the head's address, "
                          "e.g. 127.0.0.1:6390 (launch/ray/two_nodes_local.sh status prints it)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ConfigError(f"error: Ray cluster at {address} does not answer ({error.strerror or error}); start it "
                          "(launch/ray/two_nodes_local.sh start) or fix --address / ray_address") from None
    return address


def init_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Start a local Ray with ``num_cpus`` cores (default: all), or join the cluster at ``address`` (``host:port``
    of its head, checked first: :func:`check_cluster_address`), else the one named by ``RAY_ADDRESS``.

    ``ray job submit`` sets ``RAY_ADDRESS`` for the driver, so the same command line runs locally and on a
    cluster; a cluster's size is its own, so ``num_cpus`` is ignored there. Returns True when this call
    started Ray (the caller then shuts it down), False when Ray was already running in this process.
    """
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        address = check_cluster_address(address)
        if num_cpus is not None:
            log.warning("joining the Ray cluster at %s: --num-cpus %s is ignored", address, num_cpus)
        try:
            ray.init(address=address)
        except ray.exceptions.AuthenticationError:
            raise ConfigError(f"error: the Ray cluster at {address} refused this driver's token; export "
                              "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the cluster's auth_token> "
                              "(launch/ray/two_nodes_local.sh status prints them)") from None
    else:
        # "local": a Ray of this driver's own. Without it ray.init joins the newest cluster `ray start` left on
        # the host (another user's job, a test's cluster), whose shutdown then kills this job's trials.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return True


def ray_run_config(name: str, storage: str | os.PathLike, **kwargs: Any) -> Any:
    """A quiet ``tune.RunConfig`` whose results go to ``storage`` (a local folder, or a shared/cloud URI)."""
    from ray import tune

    storage = str(storage)
    if "://" not in storage:  # Ray needs an absolute local path
        storage = str(Path(storage).resolve())
    return tune.RunConfig(name=name, storage_path=storage, verbose=0, **kwargs)
