"""MLflow tracking: the one module through which training and evaluation jobs talk to MLflow.

(``harness.ops.registry`` and ``harness.ops.serving`` are the registry and serving entry points; they use it too.)

By default a run is tracked in an embedded store inside the run folder (``<out_dir>/mlruns.db`` plus an
artifact folder), so nothing needs a server. ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``) points the same
code at a real server. Model weights are registered as plain safetensors folders (never pickled models).

A server is checked before any work (``harness.ops.tracking_server``): one that does not answer, or refuses the
credentials in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, and an action the user is not permitted
(MLflow's basic-auth app, mlflow/README.md) end as one ``error:`` line (:class:`TrackingAccessError`, exit status 2).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from harness.config import TrackConfig
from harness.ops.tracking_server import TrackingAccessError, check_tracking_server, tracking_errors

__all__ = ["TrackingAccessError", "Tracker", "check_tracking_server", "local_model_dir", "resolve_tracking_uri"]

log = logging.getLogger(__name__)

def resolve_tracking_uri(track: TrackConfig, out_dir: str | Path) -> str:
    """Config URI, else $MLFLOW_TRACKING_URI, else a sqlite store in ``out_dir``."""
    if track.tracking_uri:
        return track.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(out_dir).resolve() / 'mlruns.db'}"


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def local_model_dir(model: str | Path) -> Path:
    """A model folder on this machine: ``model`` itself, or an MLflow model URI (``models:/name/version``,
    ``runs:/id/model``) downloaded through the configured tracking store. Entry points call this, so the method
    (:func:`harness.method.autoencoder.load_dae`) only ever reads local folders."""
    if str(model).startswith(MODEL_URI_SCHEMES):
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=str(model)))
    return Path(model)


class Tracker:
    """A thin handle on one MLflow run; every method is a no-op when tracking is disabled."""

    def __init__(self, track: TrackConfig, out_dir: str | Path, run_name: str | None = None,
                 run_id: str | None = None, tags: dict[str, str] | None = None) -> None:
        self.enabled = track.enabled
        self.track = track
        self.run_id: str | None = None
        self.uri: str | None = None
        if not self.enabled:
            return
        # Keep the embedded store quiet and local: no telemetry, no prompts.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        import mlflow

        self._mlflow = mlflow
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.uri = resolve_tracking_uri(track, out_dir)
        check_tracking_server(self.uri)
        # MLflow's set_tracking_uri also writes MLFLOW_TRACKING_URI into this process's environment, where every
        # later Tracker would find it (a test server long gone, another job's store): end() puts it back.
        self._environment_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            with tracking_errors(self.uri, f"start a run in experiment '{track.experiment}'"):
                experiment_id = self._experiment_id_of(track.experiment, out_dir)
                run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name, tags=tags)
        except BaseException:
            self._restore_environment()
            raise
        self.run_id = run.info.run_id

    def _restore_environment(self) -> None:
        if self._environment_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._environment_uri

    def _experiment_id_of(self, name: str, out_dir: Path) -> str:
        """The experiment's id, created when absent (by whichever of several concurrent trials comes first)."""
        from mlflow.exceptions import MlflowException

        experiment = self._mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:"):
            artifact_location = (out_dir / "mlartifacts").resolve().as_uri()
        try:
            return self._mlflow.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:  # another process created it between the lookup and here
            if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._mlflow.get_experiment_by_name(name).experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            # MLflow params are immutable: on resume the same keys arrive again with the same values.
            existing = self._mlflow.get_run(self.run_id).data.params
            fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
            if fresh:
                self._mlflow.log_params(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._mlflow.set_tags(tags)

    def register_model(self, folder: str | Path, name: str, tags: dict[str, str] | None = None,
                       artifact_path: str = "model", description: str | None = None) -> str | None:
        """Log ``folder`` (safetensors + config) under ``artifact_path`` and register it as a new version of ``name``.

        The version is tagged with ``harness.ops.registry.version_tags(folder)`` (config hash, data manifest hash,
        reconstruction metrics, weights checksum; ``tags`` take precedence) and receives the alias ``candidate``, so
        the alias always names the newest version. Weights already registered under ``name`` (same
        ``weights_sha256``) are not registered again: their version is returned. None when tracking is disabled.
        """
        if not self.enabled:
            return None
        try:
            with tracking_errors(self.uri, f"register a version of model '{name}'"):
                return self._register_model(folder, name, tags, artifact_path, description)
        except Exception:
            self.end("FAILED")  # a refused registration leaves a failed run, never one that looks complete
            raise

    def _register_model(self, folder: str | Path, name: str, tags: dict[str, str] | None, artifact_path: str,
                        description: str | None) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from harness.ops.registry import CANDIDATE, version_tags

        client = MlflowClient(self.uri)
        all_tags = {**version_tags(folder), **(tags or {})}
        try:
            client.get_registered_model(name)
        except MlflowException as error:
            # An auth server answers 403, not 404, for a model that does not exist (so that names do not leak):
            # creating it tells the two apart. If it exists, the user may not read it: the 403 stands.
            if getattr(error, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):
                raise
            try:
                client.create_registered_model(
                    name, description=description or "Diffusion autoencoder (EMA weights, safetensors)")
            except MlflowException as create_error:
                if getattr(create_error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                if error.error_code == "PERMISSION_DENIED":
                    raise error from None
                # else a concurrent registration created it between the lookup and here: add to it
        else:  # the same weights registered again (e.g. a rerun of a finished run): reuse their version
            digest = all_tags.get("weights_sha256")
            same = client.search_model_versions(f"name = '{name}' and tag.weights_sha256 = '{digest}'") if digest \
                else []
            if same:
                version = min(same, key=lambda v: int(v.version)).version
                self._mlflow.set_tags({f"registered.{name}": str(version)})
                return version
        self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
        source = f"{self._mlflow.get_artifact_uri(artifact_path)}"
        version = client.create_model_version(name, source=source, run_id=self.run_id, tags=all_tags)
        client.set_registered_model_alias(name, CANDIDATE, version.version)
        self._mlflow.set_tags({f"registered.{name}": str(version.version)})
        return version.version

    def log_child_run(self, name: str, params: dict[str, Any], metrics: dict[str, float] | None = None,
                      tags: dict[str, str] | None = None,
                      history: dict[str, list[tuple[int, float]]] | None = None) -> str | None:
        """Record a finished run nested under this one (e.g. one tuning trial) and return its run id.

        ``metrics`` are logged at step 0; ``history`` maps a metric to ``(step, value)`` points (e.g. per epoch).
        Returns None when tracking is disabled.
        """
        if not self.enabled:
            return None
        import time

        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        if getattr(self, "_experiment_id", None) is None:
            self._experiment_id = client.get_run(self.run_id).info.experiment_id
        child = client.create_run(self._experiment_id, run_name=name,
                                  tags={"mlflow.parentRunId": self.run_id, **(tags or {})})
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()]
        for key, points in (history or {}).items():
            entries += [Metric(key, float(value), now, int(step)) for step, value in points]
        fields = [Param(key, str(value)[:6000]) for key, value in params.items()]
        # one batch holds at most 100 params and 1000 entries in all
        batches = max(math.ceil(len(entries) / 900), math.ceil(len(fields) / 100), 1)
        for index in range(batches):
            client.log_batch(child.info.run_id, metrics=entries[index * 900:(index + 1) * 900],
                             params=fields[index * 100:(index + 1) * 100])
        client.set_terminated(child.info.run_id)
        return child.info.run_id

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
        if self.enabled:
            self._restore_environment()
