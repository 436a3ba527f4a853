"""Readers of WebDataset shards: deterministic, resumable training streams and one-pass evaluation streams.

Readers yield batches ``{"image": (B, C, H, W) float in [-1, 1], "key": [str], "labels": {column: (B,)},
"meta": [dict]}``: scalar numeric label columns become tensors (int -> long, float -> float32), everything
else (a phantom's parameters, strings) stays per sample in ``meta``.

Training streams are infinite and determined by (seed, rank, world_size, num_workers, batch_size): each rank
reads shards ``rank::world_size`` in a fresh seeded order every pass, DataLoader workers take turns over that
order, a seeded buffer shuffles samples, and a sample's augmentation is seeded by its position in its worker's
stream. Because the DataLoader takes batches from workers round-robin, each worker's batch count at global
batch ``k`` is known, so ``start_batch=k`` only drops raw, undecoded samples after the shuffle buffer and the
resumed stream equals the uninterrupted one. Tar parsing, shuffle buffer, batching and loader are webdataset's;
decoding, the resumable worker split, rank selection and error bookkeeping are small custom stages.

Damaged input is handled by ``on_error``: ``"raise"`` stops with a ``ShardError`` naming the shard and sample,
``"skip"`` logs it, drops the sample (or the rest of an unreadable shard) and counts it in
``ShardLoader.skipped``. The folder layout and the writer are in :mod:`harness.data.shards`.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from harness.data.shards import MANIFEST_NAME, ShardError, read_manifest
from harness.data.transforms import AugmentSpec, decode_image, prepare_image

logger = logging.getLogger(__name__)

__all__ = ["ShardLoader", "eval_loader", "train_loader"]


def _derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence hashing avoids correlated neighbouring seeds)."""
    low, high = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


@dataclass
class _ErrorLog:
    """Per-worker error policy (raise ``ShardError``, or log, count and skip); tracks where reading is."""

    on_error: str
    current_shard: str = "?"
    current_member: str | None = None
    pending: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, message) since last batch
    shard_reported: bool = False  # the current shard visit already had a tar-level error

    def track_shards(self, source: Iterable[dict]) -> Iterator[dict]:
        for item in source:  # tar reading pulls the next shard only after finishing the previous one
            self.current_shard, self.current_member, self.shard_reported = item["url"], None, False
            yield item

    def note_member(self, name: str) -> str:
        self.current_member = name  # webdataset calls this (as rename_files) before reading each member
        return name

    def handle_tar_error(self, exc: Exception) -> bool:
        """webdataset's handler for tar reading errors; returning True moves on to the next shard."""
        if isinstance(exc, ShardError):  # raised here one stage down; webdataset then appended to its args
            exc.args = exc.args[:1]
            raise exc
        if not self.shard_reported:  # several stages notice one broken shard: report it once per visit
            key = self.current_member.split(".", 1)[0] if self.current_member else "(start of shard)"
            rest = "; the rest of the shard is skipped" if self.on_error == "skip" else ""
            self.report(ShardError(f"shard {self.current_shard}: sample {key!r}: unreadable tar data "
                                   f"({type(exc).__name__}: {exc.args[0] if exc.args else ''}){rest}"),
                        self.current_shard, key, exc)
            self.shard_reported = True
        return True

    def report(self, error: ShardError, shard: str, key: str, cause: BaseException | None) -> None:
        if self.on_error == "raise":
            raise error from cause
        logger.warning("skipping: %s", error)
        self.pending.append((shard, key, str(error)))


def _decode(raw: dict[str, Any], *, image_size: int | None, channels: int, augment: AugmentSpec | None,
            augment_seed: int | None, native_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Raw tar sample -> {"image": (C, S, S), "key", "labels": numeric scalars, "meta": the rest}.

    Without resizing (``image_size=None``) every image must have the folder's ``native_size`` (H, W): one image
    of another size would otherwise fail later, in batching, without naming the sample.
    """
    shard, key = raw.get("__url__", "?"), raw["__key__"]
    image_field = next((name for name in ("image.png", "image.npy") if name in raw), None)
    fields = sorted(name for name in raw if not name.startswith("__"))
    if image_field is None or "labels.json" not in raw:
        raise ShardError(f"shard {shard}: sample {key!r}: needs an image.png or image.npy and labels.json, "
                         f"has {fields}")
    try:
        labels = json.loads(raw["labels.json"])
        if not isinstance(labels, dict):
            raise ValueError(f"expected a JSON object, got {type(labels).__name__}")
    except ValueError as exc:
        raise ShardError(f"shard {shard}: sample {key!r}: bad labels.json ({exc})") from exc
    generator = torch.Generator().manual_seed(augment_seed) if augment is not None else None
    try:
        array = decode_image(raw[image_field], image_field.rsplit(".", 1)[1])
        if image_size is None and native_size is not None and tuple(array.shape[:2]) != tuple(native_size):
            raise ValueError(f"image is {array.shape[0]}x{array.shape[1]} but {MANIFEST_NAME} gives "
                             f"{native_size[0]}x{native_size[1]}; pass image_size to resize")
        image = prepare_image(array, image_size=image_size, channels=channels, augment_spec=augment,
                              generator=generator)
    except Exception as exc:  # PIL and numpy raise many types for corrupt data
        raise ShardError(f"shard {shard}: sample {key!r}: undecodable or unusable {image_field} ({exc})") from exc
    # null is a missing label (e.g. an uncertain finding under the "ignore" policy): a number (NaN) once batched,
    # so a label column stays a column whichever samples of a batch lack it.
    numeric = {c: v for c, v in labels.items() if v is None or isinstance(v, (bool, int, float))}
    meta = {c: v for c, v in labels.items() if c not in numeric}
    return {"image": image, "key": key, "labels": numeric, "meta": meta}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples; a label column becomes a tensor only if every sample has it as a number or null (NaN)."""
    common = set.intersection(*(set(s["labels"]) for s in samples))
    labels, meta = {}, [dict(s["meta"]) for s in samples]
    for column in sorted(common):
        values = [s["labels"][column] for s in samples]
        integral = all(isinstance(v, (bool, int)) for v in values)
        values = [float("nan") if v is None else v for v in values]
        labels[column] = torch.tensor(values, dtype=torch.long if integral else torch.float32)  # (B,)
    for sample, extra in zip(samples, meta, strict=True):
        extra.update({c: v for c, v in sample["labels"].items() if c not in common})
    return {"image": torch.stack([s["image"] for s in samples]),  # (B, C, H, W)
            "key": [s["key"] for s in samples], "labels": labels, "meta": meta}


def _decode_stage(source: Iterable[tuple[int, dict]], log: _ErrorLog, seed_parts: tuple[int, ...] | None,
                  **decode_kw: Any) -> Iterator[dict[str, Any]]:
    for position, raw in source:
        augment_seed = _derive_seed(*seed_parts, position) if seed_parts is not None else None
        try:
            yield _decode(raw, augment_seed=augment_seed, **decode_kw)
        except ShardError as exc:
            log.report(exc, raw.get("__url__", "?"), raw.get("__key__", "?"), exc.__cause__)


def _with_bookkeeping(batches: Iterable[dict], log: _ErrorLog) -> Iterator[dict]:
    """Attach the worker's new skip events to each batch; an empty marker carries any left at the end."""
    for batch in batches:
        batch["_skips"], log.pending = log.pending, []
        yield batch
    if log.pending:
        yield {"_skips": log.pending, "_empty": True}


def _epoch_shards(urls: list[str], seed: int, rank: int) -> Iterator[dict[str, str]]:
    """Infinite shard stream: every pass visits each of the rank's shards once, in a fresh seeded order."""
    for epoch in itertools.count():
        order = list(urls)
        random.Random(_derive_seed(seed, rank, epoch, 0x5A4D)).shuffle(order)
        yield from ({"url": url} for url in order)


def _select_rank(source: Iterable[dict], shard_index: dict[str, int], rank: int, world_size: int) -> Iterator[dict]:
    """Keep sample j of shard s on rank (s + j) % world_size: each sample once over all ranks, balanced."""
    seen: Counter = Counter()
    for sample in source:
        url = sample["__url__"]
        if (shard_index[url] + seen[url]) % world_size == rank:
            yield sample
        seen[url] += 1


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker needs to build its pipeline (plain data, so it pickles into worker processes)."""

    urls: tuple[str, ...]
    training: bool
    batch_size: int
    image_size: int | None
    channels: int
    augment: AugmentSpec | None
    seed: int
    rank: int
    world_size: int
    num_workers: int
    start_batch: int
    on_error: str
    shuffle_buffer: int
    native_size: tuple[int, int] | None = None  # (H, W) of the folder, from its manifest


class _ShardStream(torch.utils.data.IterableDataset):
    """Builds a fresh webdataset pipeline inside each worker, so per-worker state never leaks between them."""

    def __init__(self, spec: _StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        log = _ErrorLog(spec.on_error)
        read_tars = wds.tarfile_to_samples(handler=log.handle_tar_error, rename_files=log.note_member)
        decode_kw = dict(image_size=spec.image_size, channels=spec.channels, native_size=spec.native_size, log=log)
        if spec.training:
            # The DataLoader collects batches round-robin starting at worker 0, so global batch k comes from
            # worker k % W. A stream resumed at batch k therefore hands worker w the role of the original
            # worker (w + k) % W (hence no wds.split_by_worker here), and that worker had already produced
            # len(range(role, k, W)) batches: skip that many batches' worth of raw samples.
            role = (worker + spec.start_batch) % num_workers
            skip = len(range(role, spec.start_batch, num_workers)) * spec.batch_size
            shuffle_rng = random.Random(_derive_seed(spec.seed, spec.rank, spec.world_size, role, num_workers))
            stages = [
                functools.partial(_epoch_shards, list(spec.urls), spec.seed, spec.rank),
                lambda shards: itertools.islice(shards, role, None, num_workers),
                log.track_shards, read_tars,
                wds.shuffle(spec.shuffle_buffer, min(100, spec.shuffle_buffer), rng=shuffle_rng),
                lambda source: itertools.islice(enumerate(source), skip, None),  # raw samples: skipping is cheap
                functools.partial(_decode_stage, augment=spec.augment, **decode_kw,
                                  seed_parts=(spec.seed, spec.rank, spec.world_size, role, num_workers)),
                wds.batched(spec.batch_size, collation_fn=_collate, partial=False),
            ]
        else:
            index = {url: i for i, url in enumerate(spec.urls)}
            stages = [
                wds.SimpleShardList(list(spec.urls)), wds.split_by_worker, log.track_shards, read_tars,
                functools.partial(_select_rank, shard_index=index, rank=spec.rank, world_size=spec.world_size),
                enumerate, functools.partial(_decode_stage, augment=None, seed_parts=None, **decode_kw),
                wds.batched(spec.batch_size, collation_fn=_collate, partial=True),
            ]
        return _with_bookkeeping(wds.DataPipeline(*stages), log)


class ShardLoader:
    """Iterable of batches; ``skipped`` counts samples dropped under ``on_error="skip"`` (``skipped_samples``
    lists them as (shard, key, message)). Each ``iter()`` starts the stream afresh. A single-rank evaluation
    pass also checks the number of samples against the manifest."""

    def __init__(self, dataset: _ShardStream, expected_count: int | None = None) -> None:
        self.dataset = dataset
        self.expected_count = expected_count  # samples one full pass must deliver (single-rank evaluation)
        self.skipped_samples: list[tuple[str, str, str]] = []
        self.missing = 0  # samples absent without any error (a tar cut at a member boundary), skip mode only

    @property
    def skipped(self) -> int:
        return len(self.skipped_samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.dataset.spec
        workers = spec.num_workers
        source = self.dataset if workers == 0 else wds.WebLoader(self.dataset, batch_size=None, num_workers=workers)
        batches = iter(source)
        read = skipped = 0  # in this pass
        try:
            for batch in batches:
                events = batch.pop("_skips")
                self.skipped_samples.extend(tuple(event) for event in events)
                skipped += len(events)
                if not batch.pop("_empty", False):
                    read += len(batch["key"])
                    yield batch
        finally:
            if hasattr(batches, "close"):
                batches.close()  # shut DataLoader workers down now, also when a ShardError propagates
        if self.skipped:
            logger.warning("%d sample(s) skipped because of read errors so far", self.skipped)
        if self.expected_count is not None and read + skipped != self.expected_count:
            # A tar cut at a member boundary reads as a shorter, valid tar; only the count can tell.
            error = ShardError(f"shards {spec.urls[0]} .. {spec.urls[-1]}: {MANIFEST_NAME} lists "
                               f"{self.expected_count} samples but {read} were read and {skipped} skipped; "
                               "verify_shards() names the damaged shard")
            if spec.on_error == "raise":
                raise error
            logger.warning("%s", error)
            self.missing += self.expected_count - read - skipped


def _split_shards(shard_dir: str | Path, split: str) -> tuple[list[str], dict[str, Any]]:
    """Paths of the split's shards (each must exist) and the folder's manifest."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise ShardError(f"{shard_dir / MANIFEST_NAME}: no split {split!r}; has {sorted(splits)}")
    paths = [str(shard_dir / name) for name in splits[split]["shards"]]
    for path in paths:
        if not os.path.isfile(path):
            raise ShardError(f"{path}: shard of split {split!r} is missing")
    return paths, manifest


def _check_common(batch_size: int, channels: int, num_workers: int, rank: int, world_size: int, on_error: str) -> None:
    if batch_size < 1 or channels not in (1, 3) or num_workers < 0 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1, channels in (1, 3), num_workers >= 0, 0 <= rank < world_size; got "
                         f"{batch_size}, {channels}, {num_workers}, rank {rank} of {world_size}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")


def train_loader(shard_dir: str | Path, batch_size: int, *, split: str = "train", image_size: int | None = None,
                 channels: int = 1, augment: AugmentSpec | None = None, num_workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0, on_error: str = "raise",
                 shuffle_buffer: int = 1000) -> ShardLoader:
    """Infinite, shuffled, resampled training batches of this rank; ``start_batch=k`` resumes exactly at batch k."""
    _check_common(batch_size, channels, num_workers, rank, world_size, on_error)
    if start_batch < 0 or shuffle_buffer < 1:
        raise ValueError(f"start_batch={start_batch} must be >= 0 and shuffle_buffer={shuffle_buffer} >= 1")
    urls, manifest = _split_shards(shard_dir, split)
    if len(urls) < world_size:
        raise ShardError(f"{shard_dir}: split {split!r} has {len(urls)} shard(s) for {world_size} ranks; "
                         "write it with a smaller samples_per_shard")
    spec = _StreamSpec(tuple(urls[rank::world_size]), True, batch_size, image_size, channels, augment, seed, rank,
                       world_size, num_workers, start_batch, on_error, shuffle_buffer, tuple(manifest["image_size"]))
    return ShardLoader(_ShardStream(spec))


def eval_loader(shard_dir: str | Path, batch_size: int, *, split: str = "test", image_size: int | None = None,
                channels: int = 1, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                on_error: str = "raise") -> ShardLoader:
    """One deterministic pass over this rank's share of ``split`` (every sample once over all ranks), no
    augmentation; the last batch may be smaller. Order is fixed for a given ``num_workers``."""
    _check_common(batch_size, channels, num_workers, rank, world_size, on_error)
    urls, manifest = _split_shards(shard_dir, split)
    spec = _StreamSpec(tuple(urls), False, batch_size, image_size, channels, None, 0, rank, world_size, num_workers,
                       0, on_error, 1, tuple(manifest["image_size"]))
    expected = manifest["splits"][split]["count"] if world_size == 1 else None
    return ShardLoader(_ShardStream(spec), expected)
