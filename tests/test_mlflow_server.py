"""The tracking server as a lab runs it: PostgreSQL store, MLflow's basic-auth app, users and permissions.

One PostgreSQL cluster (``mlflow/start_postgres.sh``) and one ``mlflow/start_server.sh --auth`` server on free
loopback ports serve the whole module and are stopped at its end. Skipped only where the PostgreSQL server
programs are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from helpers.serving import export_tiny_dae, free_port, start_server, stop_server, wait_until_ready

from harness.cli import run_main
from harness.command import main as dae_cf
from harness.config import TrackConfig
from harness.ops.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"
EXPLAINERS = "dae-cf-explainer"  # the registered model name only trusted users may add versions to


def _postgres_installed() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


pytestmark = pytest.mark.slow


def _script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("DAE_CF_PG_", "DAE_CF_MLFLOW_"))}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"  # mlflow
    return subprocess.run(["bash", str(ROOT / "mlflow" / name), *args], capture_output=True, text=True, timeout=60,
                          env={**environment, **(env or {})})


def test_scripts_refuse_to_start_without_passwords_before_writing_anything(tmp_path):
    """No password that works by default: without one, each script says what to pass, exits 2, creates nothing."""
    store, cluster = tmp_path / "mlflow", tmp_path / "postgres"
    refused = _script("start_server.sh", "--auth", "--store", str(store))
    assert refused.returncode == 2 and not store.exists()
    assert "--admin-password-file" in _one_error_line(refused.stderr)
    short = _script("start_server.sh", "--auth", "--store", str(store), env={"DAE_CF_MLFLOW_ADMIN_PASSWORD": "short"})
    assert short.returncode == 2 and "12 characters" in _one_error_line(short.stderr) and not store.exists()
    refused = _script("start_postgres.sh", str(cluster), "--port", "5999")
    assert refused.returncode == 2 and not cluster.exists()
    line = _one_error_line(refused.stderr)
    assert ("--password-file" in line) if _postgres_installed() else ("apt-get install postgresql" in line)


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory) -> Iterator[dict]:
    """PostgreSQL (databases mlflow + mlflow_auth) and an auth-enabled MLflow server on it, 2 workers."""
    if not _postgres_installed():
        pytest.skip("PostgreSQL server programs (initdb) are not installed: apt-get install postgresql (.ci/run does)")
    # The cluster belongs to the `postgres` system user when the tests run as root: it needs a folder it can
    # enter, which pytest's private temporary folders are not.
    cluster = Path(tempfile.mkdtemp(prefix="dae-cf-pg-"))
    store = tmp_path_factory.mktemp("lab-mlflow")
    pg_port, port = free_port(), free_port()
    admin_password = secrets.token_urlsafe(18)
    env = {**os.environ, "DAE_CF_PG_PASSWORD": secrets.token_urlsafe(18),
           "DAE_CF_MLFLOW_ADMIN_PASSWORD": admin_password}
    postgres = ["bash", str(ROOT / "mlflow" / "start_postgres.sh"), str(cluster), "--port", str(pg_port)]
    process = None
    try:
        started = time.monotonic()
        subprocess.run(postgres, env=env, check=True, capture_output=True, text=True, timeout=120)
        postgres_s = time.monotonic() - started
        again = subprocess.run(postgres, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stderr  # idempotent
        with pytest.MonkeyPatch.context() as patch:
            for key in ("DAE_CF_PG_PASSWORD", "DAE_CF_MLFLOW_ADMIN_PASSWORD"):
                patch.setenv(key, env[key])
            log = store / "server.log"
            started = time.monotonic()
            process = start_server(["bash", str(ROOT / "mlflow" / "start_server.sh"), "--auth", "--store",
                                    str(store), "--port", str(port), "--workers", "2", "--backend-uri",
                                    f"postgresql://mlflow@127.0.0.1:{pg_port}/mlflow"], log)
        uri = f"http://127.0.0.1:{port}"
        wait_until_ready(process, f"{uri}/health", log, timeout=180)
        print(f"\nPostgreSQL cluster ready in {postgres_s:.1f} s, MLflow server (auth, 2 workers) in "
              f"{time.monotonic() - started:.1f} s")
        yield {"uri": uri, "store": store, "admin": ("admin", admin_password)}
    finally:
        if process is not None:
            stop_server(process)
        subprocess.run([*postgres, "--stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(cluster, ignore_errors=True)


@contextmanager
def signed_in(user: str, password: str) -> Iterator[None]:
    """MLflow clients created inside act as ``user`` (MLflow reads the credentials from the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", user)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


@pytest.fixture(scope="module")
def users(lab_server) -> dict[str, tuple[str, str]]:
    """Two lab members created by the admin: alice (will be trusted with the explainer model) and bob."""
    from mlflow.server import get_app_client

    accounts = {name: (name, secrets.token_urlsafe(15)) for name in ("alice", "bob")}
    with signed_in(*lab_server["admin"]):
        admin_api = get_app_client("basic-auth", tracking_uri=lab_server["uri"])
        for user, password in accounts.values():
            admin_api.create_user(user, password)
    return {**accounts, "admin": lab_server["admin"]}


def _one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def test_requests_without_valid_credentials_are_refused(lab_server, users):
    uri = lab_server["uri"]
    assert requests.get(f"{uri}/health", timeout=10).status_code == 200  # health checks stay open
    assert requests.get(f"{uri}{SEARCH}", timeout=10).status_code == 401
    assert requests.get(f"{uri}{SEARCH}", auth=("admin", "not-the-password"), timeout=10).status_code == 401
    assert requests.get(f"{uri}{SEARCH}", auth=("mallory", "any-password-1"), timeout=10).status_code == 401
    assert requests.get(f"{uri}{SEARCH}", auth=users["admin"], timeout=10).status_code == 200
    assert requests.get(f"{uri}{SEARCH}", auth=users["bob"], timeout=10).status_code == 200
    config = lab_server["store"] / "basic_auth.ini"  # names the admin's password: the owner alone may read it
    assert config.stat().st_mode & 0o777 == 0o600
    assert "default_permission = NO_PERMISSIONS" in config.read_text()


def test_unreachable_server_and_wrong_password_fail_in_one_line_before_any_work(lab_server, users, capsys):
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert dae_cf(["promote", "--tracking-uri", closed, "--name", "any", "--version", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "does not answer" in line and "Connection refused" in line and closed in line
    assert time.monotonic() - started < 15  # no retries with back-off
    with signed_in("alice", "a-wrong-password"):
        assert dae_cf(["promote", "--tracking-uri", lab_server["uri"], "--name", "any", "--version", "1"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "refused the credentials of user 'alice'" in line and "MLFLOW_TRACKING_PASSWORD" in line
        # a training job's tracker: refused before its run exists
        assert run_main(lambda argv: Tracker(TrackConfig(tracking_uri=lab_server["uri"], experiment="never"),
                                             lab_server["store"] / "job"), []) == 2
        assert "HTTP 401" in _one_error_line(capsys.readouterr().err)
    assert requests.get(f"{lab_server['uri']}/api/2.0/mlflow/experiments/get-by-name",
                        params={"experiment_name": "never"}, auth=users["admin"], timeout=10).status_code == 404


def test_only_users_granted_manage_register_and_promote_explainers(lab_server, users, tmp_path, capsys):
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    uri = lab_server["uri"]
    model_dir = export_tiny_dae(tmp_path / "dae")
    with signed_in(*users["admin"]):  # the admin owns the explainers' registered model, version 1
        admin = Tracker(TrackConfig(tracking_uri=uri, experiment="lab-admin"), tmp_path / "admin")
        assert admin.register_model(model_dir, EXPLAINERS, tags={"recon_mse": "0.05"}) == "1"
        admin.end()
    capsys.readouterr()  # MLflow's own log lines of the admin's registration

    retrained = export_tiny_dae(tmp_path / "retrained", recon_mse=0.04, seed=1)

    def register() -> str | None:
        tracker = Tracker(TrackConfig(tracking_uri=uri, experiment="alice-work"), tmp_path / "alice")
        version = tracker.register_model(retrained, EXPLAINERS)  # a refusal ends the run itself, as FAILED
        tracker.end()
        return version

    def promote(version: str) -> int:
        return dae_cf(["promote", "--tracking-uri", uri, "--name", EXPLAINERS, "--version", version])

    with signed_in(*users["alice"]):
        assert run_main(lambda argv: register(), []) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"user 'alice' is not permitted to register a version of model '{EXPLAINERS}'" in line
        assert promote("1") == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"not permitted to promote version 1 of model '{EXPLAINERS}'" in line and "HTTP 403" in line
        own_runs = MlflowClient(uri).search_runs(
            [MlflowClient(uri).get_experiment_by_name("alice-work").experiment_id])
        assert [run.info.status for run in own_runs] == ["FAILED"]  # the refused attempt never looks complete

    with signed_in(*users["admin"]):
        versions = MlflowClient(uri).search_model_versions(f"name='{EXPLAINERS}'")
        assert [v.version for v in versions] == ["1"]  # nothing registered by the refused user
        get_app_client("basic-auth", tracking_uri=uri).grant_user_permission(
            "alice", "registered_model", EXPLAINERS, "MANAGE")

    with signed_in(*users["alice"]):
        assert register() == "2"
        assert promote("2") == 0  # no champion yet: its own valid metrics suffice
        assert "no current champion" in capsys.readouterr().out
    with signed_in(*users["bob"]):  # bob was granted nothing: he can neither see nor promote it
        assert promote("2") == 2
        assert "user 'bob' is not permitted" in _one_error_line(capsys.readouterr().err)
    with signed_in(*users["admin"]):
        client = MlflowClient(uri)
        assert client.get_model_version_by_alias(EXPLAINERS, "champion").version == "2"
        assert client.get_model_version_by_alias(EXPLAINERS, "candidate").version == "2"


def test_promotion_gate_over_the_lab_server(lab_server, users, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri, name = lab_server["uri"], "dae-cf-lab-gate"
    with signed_in(*users["bob"]):  # any user may create a model of their own and manages it
        versions = []
        for index, recon in enumerate((0.05, 0.08, 0.04)):
            tracker = Tracker(TrackConfig(tracking_uri=uri, experiment="bob-gate"), tmp_path / "bob",
                              run_name=f"train-{index}")
            tracker.log_metrics({"val/recon_mse": recon}, step=1)
            folder = export_tiny_dae(tmp_path / f"dae-{index}", recon_mse=recon, seed=index)
            versions.append(tracker.register_model(folder, name))
            tracker.end()
        assert versions == ["1", "2", "3"]

        def promote(version: str) -> int:
            return dae_cf(["promote", "--tracking-uri", uri, "--name", name, "--version", version])

        assert promote("1") == 0
        assert promote("2") == 1 and "0.08 > 0.05" in capsys.readouterr().out  # worse reconstruction
        assert dae_cf(["promote", "tag", "--tracking-uri", uri, "--name", name, "--version", "1",
                       "fracture/svm/auc=0.9"]) == 0
        assert promote("3") == 1 and "fracture/svm/auc: missing" in capsys.readouterr().out
        assert dae_cf(["promote", "tag", "--tracking-uri", uri, "--name", name, "--version", "3",
                       "fracture/svm/auc=0.91"]) == 0
        assert promote("3") == 0
        client = MlflowClient(uri)
        assert client.get_model_version_by_alias(name, "champion").version == "3"
        assert client.get_model_version(name, "3").tags["previous_champion"] == "1"
    with signed_in(*users["alice"]):  # default permission NO_PERMISSIONS: others' models stay private
        assert dae_cf(["promote", "show", "--tracking-uri", uri, "--name", name]) == 2
        assert "not permitted" in _one_error_line(capsys.readouterr().err)


def test_concurrent_logging_from_two_ray_nodes_loses_nothing(lab_server, users, tmp_path):
    """2 x N trials, N pinned to each node of a two-node Ray cluster, log at once; every point arrives."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    per_node, steps, keys = 6, 3, ("val/auc", "val/f1", "train/loss", "fit_seconds")
    uri, (user, password) = lab_server["uri"], users["bob"]

    def trial(index: int, out_dir: str) -> dict:  # nested: Ray ships it by value to the nodes' workers
        import json
        import os

        import ray

        from harness.config import TrackConfig
        from harness.ops.tracking import Tracker

        os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
        node = ray.get_runtime_context().get_node_id()
        tracker = Tracker(TrackConfig(tracking_uri=uri, experiment="ray-trials"), out_dir,
                          run_name=f"trial-{index}", tags={"trial": str(index), "ray.node_id": node})
        for step in range(steps):
            tracker.log_metrics({key: index + step / 10 + offset for offset, key in enumerate(keys)}, step=step)
        artifact = Path(out_dir) / f"trial-{index}.json"
        artifact.write_text(json.dumps({"trial": index, "node": node}))
        tracker.log_artifact(artifact)
        tracker.end()
        return {"run_id": tracker.run_id, "node": node}

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_DISABLE_USAGE_STATS", "1")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"head_slot": 1}, "include_dashboard": False})
        second = cluster.add_node(num_cpus=1, resources={"second_slot": 1})
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            remote = ray.remote(trial)
            started = time.monotonic()
            futures = {index: remote.options(num_cpus=1, resources={"head_slot" if index % 2 else "second_slot": 1})
                       .remote(index, str(tmp_path / f"trial-{index}")) for index in range(2 * per_node)}
            done = {index: result for index, result in zip(futures, ray.get(list(futures.values())), strict=True)}
            elapsed = time.monotonic() - started
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(f"\n{2 * per_node} runs from two Ray nodes in {elapsed:.1f} s: {2 * per_node / elapsed:.2f} runs/s")

    assert {done[i]["node"] for i in done if i % 2 == 0} == {second.node_id}
    assert len({done[i]["node"] for i in done}) == 2
    with signed_in(user, password):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("ray-trials")
        runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id], max_results=100)}
        assert set(runs) == {result["run_id"] for result in done.values()}
        for index, result in done.items():
            run = runs[result["run_id"]]
            assert run.info.status == "FINISHED" and run.data.tags["trial"] == str(index)
            assert run.data.tags["ray.node_id"] == result["node"]
            for offset, key in enumerate(keys):
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                assert history == [(step, pytest.approx(index + step / 10 + offset)) for step in range(steps)]
            local = client.download_artifacts(run.info.run_id, f"trial-{index}.json", str(tmp_path / "back"))
            assert Path(local).read_text() == f'{{"trial": {index}, "node": "{result["node"]}"}}'
