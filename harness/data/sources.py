"""Make sure a run's shards exist and are the ones its job asks for: generate the phantoms (vertebra or chest
X-ray: :mod:`harness.data.cxr_shards`) or prepare a MedMNIST file on first use, and refuse a folder made from other
settings or inputs.

Called by entry points on the main process only (others wait at a barrier). A folder that already holds shards
is reused only when its recorded recipe (phantoms: size, counts, seed; MedMNIST: the input's checksum, size, fit,
channels) matches the job; :func:`check_shards_match` then refuses a job whose image size or channels
contradict the manifest, before anything is trained on silently resized or re-coloured images.
"""

from __future__ import annotations

from pathlib import Path

from harness.config import DataConfig
from harness.data.shards import MANIFEST_NAME, ShardError, read_manifest, write_phantom_shards


def ensure_shards(data: DataConfig, progress: bool = True) -> Path:
    """Return ``data.shard_dir``, creating its shards from the configured source when absent.

    Raises ``ShardError`` / ``PrepareError`` naming the differing fields when the folder holds other shards.
    """
    shard_dir = Path(data.shard_dir)
    if data.source == "phantoms":
        n_train, n_val, n_test = data.phantom_counts
        write_phantom_shards(shard_dir, size=data.image_size, n_train=n_train, n_val=n_val, n_test=n_test,
                             seed=data.seed, samples_per_shard=data.samples_per_shard)
    elif data.source == "cxr_phantoms":
        from harness.data.cxr_shards import write_cxr_phantom_shards

        write_cxr_phantom_shards(shard_dir, image_size=data.image_size, counts=data.phantom_counts, seed=data.seed,
                                 samples_per_shard=data.samples_per_shard)
    elif data.source == "medmnist":
        from harness.data.prepare.common import RunOptions
        from harness.data.prepare.medmnist import prepare_medmnist

        if not Path(data.raw_path).is_file():
            raise FileNotFoundError(f"error: data.raw_path {data.raw_path} not found: put the MedMNIST .npz there "
                                    "or set data.raw_path")
        # The preparation fingerprints its inputs and settings: the same ones return at once, others are refused.
        prepare_medmnist(data.raw_path, shard_dir, size=data.image_size, fit=data.fit, channels=data.channels,
                         label_columns=list(data.label_columns) or None, num_classes=data.num_classes,
                         options=RunOptions(items_per_shard=data.samples_per_shard, progress=progress))
    elif not (shard_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"error: {shard_dir / MANIFEST_NAME} not found: prepare the shards first "
                                "(python -m harness.data.prepare ...) or set data.source to phantoms, cxr_phantoms or "
                                "medmnist")
    return shard_dir


def check_shards_match(data: DataConfig, shard_dir: str | Path | None = None) -> dict:
    """Refuse a job whose ``data.image_size`` or ``data.channels`` contradict the shards' manifest; return it."""
    return check_shard_geometry(shard_dir or data.shard_dir, data.image_size, data.channels,
                                subject="data.{key} is {value}",
                                remedy="set data.{key}: {found}, or prepare shards with {value} {unit} into another "
                                       "data.shard_dir")


def check_shard_geometry(shard_dir: str | Path, image_size: int, channels: int, subject: str, remedy: str) -> dict:
    """Refuse shards whose image size or channels differ from what a job or model needs; return the manifest.

    ``subject`` and ``remedy`` are templates with ``{key}``, ``{value}``, ``{found}`` and ``{unit}``.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    height, width = manifest["image_size"]
    where = shard_dir / MANIFEST_NAME
    if manifest["channels"] != channels:
        fields = dict(key="channels", value=channels, found=manifest["channels"], unit="channel(s)")
        held = f"{manifest['channels']}-channel images"
    elif (height, width) != (image_size, image_size):
        fields = dict(key="image_size", value=image_size, found=height if height == width else f"{height}x{width}",
                      unit="px")
        held = f"{height}x{width} images"
    else:
        return manifest
    raise ShardError(f"error: {subject.format(**fields)} but {where} holds {held}: {remedy.format(**fields)}")
