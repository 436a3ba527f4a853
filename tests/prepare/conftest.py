"""Helpers for the preparer tests: read a prepared split back, sample by sample, straight from the tar files."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness.data.shards import read_manifest


def read_split(out_dir: Path, split: str) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """key -> (image array as stored, labels dict) for every sample of ``split``."""
    samples: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    for name in read_manifest(out_dir)["splits"][split]["shards"]:
        fields: dict[str, dict[str, bytes]] = {}
        with tarfile.open(Path(out_dir) / name) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                fields.setdefault(key, {})[field] = tar.extractfile(member).read()
        for key, parts in fields.items():
            if "image.png" in parts:
                image = np.asarray(Image.open(io.BytesIO(parts["image.png"])))
            else:
                image = np.load(io.BytesIO(parts["image.npy"]))
            samples[key] = (image, json.loads(parts["labels.json"]))
    return samples


@pytest.fixture
def read_shards() -> Callable[[Path, str], dict[str, tuple[np.ndarray, dict[str, Any]]]]:
    """The :func:`read_split` helper as a fixture."""
    return read_split
