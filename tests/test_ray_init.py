"""How a job finds its Ray: its own local instance unless an address is given (never a stranger's cluster)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from harness.job_support import init_ray  # noqa: E402


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    seen: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return seen


def test_without_an_address_the_job_starts_a_ray_of_its_own(calls: list[dict]) -> None:
    # address="local" keeps ray.init from joining a cluster that `ray start` left on the host: a job once joined a
    # test's cluster that way and lost its trials when the test shut the cluster down.
    assert init_ray(num_cpus=2) is True
    assert calls == [{"address": "local", "num_cpus": 2, "include_dashboard": False}]


def test_an_address_from_the_environment_joins_that_cluster(calls: list[dict], monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    monkeypatch.setattr("harness.job_support.check_cluster_address", lambda address: address)
    assert init_ray(num_cpus=2) is True
    assert calls == [{"address": "127.0.0.1:6390"}]
