"""Make sure a run's shards exist: generate the phantoms or prepare a MedMNIST file on first use.

Called by entry points on the main process only (others wait at a barrier); a folder that already holds a
manifest is used as it is.
"""

from __future__ import annotations

from pathlib import Path

from harness.config import DataConfig
from harness.data.shards import MANIFEST_NAME, write_phantom_shards


def ensure_shards(data: DataConfig, progress: bool = True) -> Path:
    """Return ``data.shard_dir``, creating its shards from the configured source when absent."""
    shard_dir = Path(data.shard_dir)
    if (shard_dir / MANIFEST_NAME).is_file():
        return shard_dir
    if data.source == "phantoms":
        n_train, n_val, n_test = data.phantom_counts
        write_phantom_shards(shard_dir, size=data.image_size, n_train=n_train, n_val=n_val, n_test=n_test,
                             seed=data.seed, samples_per_shard=data.samples_per_shard)
    elif data.source == "medmnist":
        from harness.data.prepare.common import RunOptions
        from harness.data.prepare.medmnist import prepare_medmnist

        prepare_medmnist(data.raw_path, shard_dir, size=data.image_size, fit=data.fit, channels=data.channels,
                         options=RunOptions(items_per_shard=data.samples_per_shard, progress=progress))
    else:
        raise FileNotFoundError(f"{shard_dir / MANIFEST_NAME} not found: prepare the shards first "
                                f"(python -m harness.data.prepare ...) or set data.source")
    return shard_dir
