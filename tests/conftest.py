"""Fixtures shared by several test files. Shared plain helpers (not fixtures) are in ``tests/helpers/``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TORCH_HOME without any weights, so nothing can be found (or downloaded) from the real cache.

    Returns the hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``), which does not exist yet.
    """
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # forget a hub dir set earlier in this process
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray (2 cores, no dashboard, no usage reporting) for every test of the module that asks for it."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_DISABLE_USAGE_STATS", "1")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()
