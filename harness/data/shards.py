"""WebDataset shards: an atomic writer with a checksummed manifest, and verification.

Layout of a shard folder::

    {split}-{index:06d}.tar   samples: {key}.image.png | {key}.image.npy, {key}.labels.json
    manifest.json             format_version, image_size [H, W], channels, image_format,
                              splits {split: {shards, count, label_counts}}, checksums {shard: sha256},
                              source, recipe (what made the samples, when known), created

The readers (``train_loader``, ``eval_loader``, ``ShardLoader``) live in :mod:`harness.data.loaders`, which imports
this module (never the other way round).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from harness.data.phantoms import generate_phantoms
from harness.data.transforms import encode_image
from harness.errors import UserError
from harness.fileio import sha256_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_FORMATS = ("png", "npy")
_SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
_KEY_PATTERN = re.compile(r"^[^./\s]+$")  # webdataset splits keys from extensions at the first dot


class ShardError(UserError, RuntimeError):
    """A shard or one of its samples is missing, corrupt or malformed; the message names shard and key."""


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` of a shard folder."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path}: no manifest; write the folder with write_shards() first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


_sha256 = sha256_file


@contextmanager
def _manifest_lock(out_dir: Path) -> Iterator[None]:
    """Serialise manifest read-modify-write between processes writing different splits of one folder."""
    with open(out_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


# --- Writing --------------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one split into ``out_dir``; use as a context manager or call :meth:`close` for the manifest.

    Each shard is written to a hidden temporary file and renamed to ``{split}-{index:06d}.tar`` only when
    complete. On close the manifest is merged (other splits are kept) and replaced atomically; shards of this
    split left over from an earlier, larger write are then removed.
    """

    def __init__(self, out_dir: str | Path, split: str, samples_per_shard: int = 1000, image_format: str = "png",
                 source: str = "", recipe: dict[str, Any] | None = None) -> None:
        if not _SPLIT_PATTERN.match(split):
            raise ValueError(f"split={split!r}: use letters, digits and underscores only")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={image_format!r}: expected one of {IMAGE_FORMATS}")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
        self.out_dir, self.split = Path(out_dir), split
        self.samples_per_shard, self.image_format, self.source = samples_per_shard, image_format, source
        self.recipe = recipe
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shards: list[str] = []
        self._checksums: dict[str, str] = {}
        self._keys: set[str] = set()
        self._label_counts: dict[str, Counter] = defaultdict(Counter)
        self._image_shape: tuple[int, ...] | None = None
        self._tar: wds.TarWriter | None = None
        self._handle: Any = None
        self._temp: Path | None = None
        self._in_shard = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.close() if exc_type is None else self.abort()

    def write(self, key: str, image: np.ndarray, labels: dict[str, Any]) -> None:
        """Validate and append one sample; ``ValueError`` names the key and what is wrong."""
        sample = {"__key__": key, f"image.{self.image_format}": self._encode_image(key, image),
                  "labels.json": self._encode_labels(key, labels)}
        if key in self._keys:
            raise ValueError(f"sample {key!r}: duplicate key in split {self.split!r}")
        if self._tar is None:
            self._temp = self.out_dir / f".{shard_name(self.split, len(self._shards))}.{os.getpid()}.tmp"
            self._handle = open(self._temp, "wb")
            self._tar = wds.TarWriter(self._handle, encoder=False, mtime=0.0)  # fixed mtime: reproducible bytes
        self._tar.write(sample)
        self._keys.add(key)
        self._count_labels(labels)
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._finish_shard()

    def close(self) -> dict[str, Any]:
        """Finish the last shard, merge this split into ``manifest.json`` atomically, return the manifest."""
        if self._tar is not None:
            self._finish_shard()
        if not self._shards:
            raise ValueError(f"split {self.split!r}: no samples were written to {self.out_dir}")
        height, width = self._image_shape[:2]
        channels = self._image_shape[2] if len(self._image_shape) == 3 else 1
        with _manifest_lock(self.out_dir):
            path = self.out_dir / MANIFEST_NAME
            manifest = read_manifest(self.out_dir) if path.exists() else {
                "format_version": FORMAT_VERSION, "image_size": [height, width], "channels": channels,
                "image_format": self.image_format, "splits": {}, "checksums": {}}
            existing = (tuple(manifest["image_size"]), manifest["channels"], manifest["image_format"])
            if existing != ((height, width), channels, self.image_format):
                raise ValueError(f"{path}: holds {existing} (image_size, channels, format); split {self.split!r} "
                                 f"has {((height, width), channels, self.image_format)}; use another folder")
            for old in manifest["splits"].get(self.split, {}).get("shards", []):
                manifest["checksums"].pop(old, None)
            manifest["splits"][self.split] = {
                "shards": list(self._shards), "count": len(self._keys),
                "label_counts": {col: dict(sorted(c.items())) for col, c in sorted(self._label_counts.items())}}
            manifest["checksums"].update(self._checksums)
            manifest["source"] = self.source
            if self.recipe is not None:
                manifest["recipe"] = self.recipe
            manifest["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            temp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
            temp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(temp, path)  # readers see the old or the new manifest, never half of one
            for stale in self.out_dir.glob(f"{self.split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
                if stale.name not in self._shards:
                    stale.unlink()
        return manifest

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file); finished shards stay but the manifest is untouched."""
        if self._tar is not None:
            self._tar.close()
            self._handle.close()
            self._temp.unlink(missing_ok=True)
            self._tar = None

    def _finish_shard(self) -> None:
        self._tar.close()
        self._handle.close()
        name = shard_name(self.split, len(self._shards))
        os.replace(self._temp, self.out_dir / name)
        self._checksums[name] = _sha256(self.out_dir / name)
        self._shards.append(name)
        self._tar, self._in_shard = None, 0

    def _encode_image(self, key: str, image: np.ndarray) -> bytes:
        if not isinstance(key, str) or not _KEY_PATTERN.match(key):
            raise ValueError(f"sample key {key!r}: must be a non-empty string without '.', '/' or whitespace")
        if not isinstance(image, np.ndarray):
            raise ValueError(f"sample {key!r}: image must be a numpy array, got {type(image).__name__}")
        image = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) or min(image.shape[:2]) < 1:
            raise ValueError(f"sample {key!r}: image shape {image.shape}, expected (H, W) or (H, W, 3)")
        allowed = ("uint8",) if self.image_format == "png" else ("uint8", "float32")
        if image.dtype.name not in allowed:
            raise ValueError(f"sample {key!r}: image dtype {image.dtype}, image_format={self.image_format!r} "
                             f"stores {allowed}")
        if image.dtype == np.float32 and not (np.isfinite(image).all() and 0.0 <= image.min() <= image.max() <= 1.0):
            raise ValueError(f"sample {key!r}: float image has NaN/inf or values outside [0, 1]")
        if self._image_shape is None:
            self._image_shape = image.shape
        elif image.shape != self._image_shape:
            raise ValueError(f"sample {key!r}: image shape {image.shape} differs from this split's {self._image_shape}")
        return encode_image(image, self.image_format)

    def _encode_labels(self, key: str, labels: dict[str, Any]) -> bytes:
        if not isinstance(labels, dict) or not all(isinstance(col, str) for col in labels):
            raise ValueError(f"sample {key!r}: labels must be a dict with string keys")
        for column, value in labels.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"sample {key!r}: label {column!r} is {value}; store missing values as null")
        try:
            return json.dumps(labels, allow_nan=False, sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sample {key!r}: labels are not JSON-serialisable ({exc})") from exc

    def _count_labels(self, labels: dict[str, Any]) -> None:
        for column, value in labels.items():  # categorical columns only: counts of floats say nothing
            if isinstance(value, bool):
                self._label_counts[column][str(value).lower()] += 1
            elif isinstance(value, (int, str)):
                self._label_counts[column][str(value)] += 1


def write_shards(samples: Iterable[tuple[str, np.ndarray, dict[str, Any]]], out_dir: str | Path, split: str,
                 samples_per_shard: int = 1000, image_format: str = "png", source: str = "",
                 recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``(key, image, labels)`` samples as one split of ``out_dir``; returns the merged manifest.

    ``recipe`` (JSON values) records what made the samples, so a later job can tell whether the folder is its own.
    """
    with ShardWriter(out_dir, split, samples_per_shard, image_format, source, recipe) as writer:
        for key, image, labels in samples:
            writer.write(key, image, labels)
    return read_manifest(out_dir)


def write_phantom_shards(out_dir: str | Path, size: int = 32, n_train: int = 2048, n_val: int = 256,
                         n_test: int = 256, seed: int = 0, samples_per_shard: int = 256,
                         overwrite: bool = False) -> Path:
    """Generate the embedded phantom data set as train/val/test shards (distinct seed per split).

    An existing folder written with the same arguments is kept as is unless ``overwrite``.
    """
    out = Path(out_dir)
    source = f"phantoms(size={size}, n=({n_train}, {n_val}, {n_test}), seed={seed})"
    counts = {"train": n_train, "val": n_val, "test": n_test}
    recipe = {"generator": "phantoms", "image_size": size, "counts": [n_train, n_val, n_test], "seed": seed}
    if (out / MANIFEST_NAME).is_file():
        manifest = read_manifest(out)
        wanted = {split: n for split, n in counts.items() if n > 0}
        same = (manifest.get("recipe") == recipe if "recipe" in manifest else manifest["source"] == source) and {
            s: v["count"] for s, v in manifest["splits"].items()} == wanted
        if same and not overwrite:
            return out
        if not overwrite:
            from harness.fingerprint import differences  # late: fingerprint imports the config module

            stored = manifest.get("recipe") or {"source": manifest.get("source")}
            diffs = differences(stored, recipe if "recipe" in manifest else {"source": source})
            raise ShardError(f"error: {out} holds other shards ({'; '.join(diffs) or manifest.get('source')}): "
                             "choose another data.shard_dir for these settings, or delete the folder to regenerate")
        for name in [*manifest["checksums"], MANIFEST_NAME]:  # only files this folder's manifest names
            (out / name).unlink(missing_ok=True)
    for split_index, (split, n) in enumerate(counts.items()):
        if n > 0:
            split_seed = int(np.random.SeedSequence([seed, split_index]).generate_state(1)[0])
            samples = generate_phantoms(n, size, split_seed, key_prefix=f"phantom-{split}")
            write_shards(samples, out, split, samples_per_shard, source=source, recipe=recipe)
    return out


def verify_shards(shard_dir: str | Path) -> None:
    """Check every shard named in the manifest exists and matches its SHA-256; ``ShardError`` names the shard."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    for split, entry in manifest["splits"].items():
        for name in entry["shards"]:
            path = shard_dir / name
            if not path.is_file():
                raise ShardError(f"{path}: shard of split {split!r} is missing")
            expected = manifest["checksums"].get(name)
            if expected is None or _sha256(path) != expected:
                raise ShardError(f"{path}: checksum does not match {MANIFEST_NAME}; the shard is corrupt or stale")
