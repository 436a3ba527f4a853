"""Data: the embedded phantom generator, WebDataset shards (writer: ``shards``, readers: ``loaders``), transforms.

Shard names are imported lazily so that ``import harness.data.phantoms`` (or ``transforms``) from core
modules never pulls in webdataset.
"""

from __future__ import annotations

import importlib
from typing import Any

from harness.data.phantoms import (
    GRADE_HEIGHT_LOSS,
    PhantomParams,
    PhantomSample,
    generate_phantoms,
    height_loss_for,
    render,
    render_central_mask,
    sample_params,
)
from harness.data.transforms import (
    AugmentSpec,
    augment,
    from_model_range,
    photometric_jitter,
    prepare_image,
    to_model_range,
)

_SHARD_NAMES = {name: "harness.data.shards" for name in (
    "ShardError", "ShardWriter", "read_manifest", "verify_shards", "write_phantom_shards", "write_shards")}
_SHARD_NAMES.update({name: "harness.data.loaders" for name in ("ShardLoader", "eval_loader", "train_loader")})


def __getattr__(name: str) -> Any:
    if name in _SHARD_NAMES:
        return getattr(importlib.import_module(_SHARD_NAMES[name]), name)
    raise AttributeError(f"module 'harness.data' has no attribute {name!r}")


__all__ = [
    "GRADE_HEIGHT_LOSS",
    "AugmentSpec",
    "PhantomParams",
    "PhantomSample",
    "augment",
    "from_model_range",
    "generate_phantoms",
    "height_loss_for",
    "photometric_jitter",
    "prepare_image",
    "render",
    "render_central_mask",
    "sample_params",
    "to_model_range",
    *_SHARD_NAMES,
]
