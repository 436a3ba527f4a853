"""Data: the embedded phantom generator, WebDataset shards (writer and readers) and image transforms."""

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
from harness.data.shards import (
    ShardError,
    ShardLoader,
    ShardWriter,
    eval_loader,
    read_manifest,
    train_loader,
    verify_shards,
    write_phantom_shards,
    write_shards,
)
from harness.data.transforms import AugmentSpec, augment, from_model_range, prepare_image, to_model_range

__all__ = [
    "GRADE_HEIGHT_LOSS",
    "AugmentSpec",
    "PhantomParams",
    "PhantomSample",
    "ShardError",
    "ShardLoader",
    "ShardWriter",
    "augment",
    "eval_loader",
    "from_model_range",
    "generate_phantoms",
    "height_loss_for",
    "prepare_image",
    "read_manifest",
    "render",
    "render_central_mask",
    "sample_params",
    "to_model_range",
    "train_loader",
    "verify_shards",
    "write_phantom_shards",
    "write_shards",
]
