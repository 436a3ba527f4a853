"""A tracker leaves the process's MLflow environment as it found it (MLflow's set_tracking_uri writes
MLFLOW_TRACKING_URI, which every later tracker of the process would otherwise follow)."""

from __future__ import annotations

from harness.config import TrackConfig
from harness.ops.tracking import Tracker


def test_an_ended_tracker_restores_the_tracking_uri_of_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'first.db'}"
    first = Tracker(TrackConfig(tracking_uri=store, experiment="first"), tmp_path / "a", run_name="first")
    first.end()
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = Tracker(TrackConfig(experiment="second"), tmp_path / "b", run_name="second")
    assert second.uri == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlruns.db'}"  # its own store, not the first's
    second.end()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'lab.db'}")
    third = Tracker(TrackConfig(tracking_uri=store, experiment="third"), tmp_path / "c", run_name="third")
    third.end()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'lab.db'}"
